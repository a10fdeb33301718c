"""`fulfil dev` (what `make run` runs) starts the broker, five services and the demo, shows
orders flowing to delivery, and stops every one of them on SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from fulfil.broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_dev(
    tmp_path: Path, *options: str, broker_port: int | None = None, external_broker: str | None = None
) -> tuple[subprocess.Popen[str], int, str]:
    """``fulfil dev`` on free ports; returns the process, order-intake's port and what it printed
    up to "Ctrl-C stops everything". ``external_broker``: KAFKA_BOOTSTRAP_SERVERS to use instead
    of the embedded one."""
    base = free_port()
    while any(_taken(base + i) for i in range(5)):
        base = free_port()
    broker_port = broker_port or free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}
    env["KAFKA_SESSION_TIMEOUT_MS"] = "3000"
    if external_broker is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = external_broker
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fulfil.cli",
            "dev",
            "--base-port",
            str(base),
            "--broker-port",
            str(broker_port),
            "--data-dir",
            str(tmp_path / "data"),
            *options,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return process, base, "".join(output)


def stop_and_check_nothing_is_left(process: subprocess.Popen[str], stop_signal: signal.Signals) -> None:
    family = descendants(process.pid)
    process.send_signal(stop_signal)
    process.wait(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in family):
        time.sleep(0.1)
    assert [pid for pid in family if alive(pid)] == []
    assert process.returncode == 0


def command_lines(pids: set[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            lines.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return lines


@pytest.mark.parametrize(
    ("stop_signal", "options"),
    [(signal.SIGINT, ()), (signal.SIGTERM, ("--no-demo",))],
    ids=["Ctrl-C-with-demo", "SIGTERM-no-demo"],
)
def test_fulfil_dev_starts_everything_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals, options: tuple[str, ...]
) -> None:
    broker_port = free_port()
    process, base, text = start_dev(tmp_path, *options, broker_port=broker_port)
    try:
        assert "Ctrl-C stops everything" in text, text
        for offset in range(5):
            assert f"127.0.0.1:{base + offset}" in text
            ready = httpx.get(f"http://127.0.0.1:{base + offset}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
        family = descendants(process.pid)
        assert len(family) >= 6  # broker + five services (uvicorn may add helpers)
        assert any("tansu" in line for line in command_lines(family))
        # The topic is keyed by order id over enough partitions for consumers to scale out.
        assert asyncio.run(partitions(f"127.0.0.1:{broker_port}", "order-events")) >= 6
        demos = [line for line in command_lines(family) if "fulfil.cli demo" in line]
        if "--no-demo" in options:
            assert demos == []
            assert "demo off" in text
        else:
            # The demo is one more child, logging where the services log.
            assert len(demos) == 1, command_lines(family)
            assert (tmp_path / "data" / "logs" / "demo.log").exists()
        stop_and_check_nothing_is_left(process, stop_signal)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_fulfil_dev_uses_the_broker_it_is_given_instead_of_starting_one(tmp_path: Path) -> None:
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        process, base, text = start_dev(tmp_path, "--no-demo", external_broker=broker.bootstrap_servers)
        try:
            assert "Ctrl-C stops everything" in text, text
            assert broker.bootstrap_servers in text
            ready = httpx.get(f"http://127.0.0.1:{base}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
            assert not any("tansu" in line for line in command_lines(descendants(process.pid)))
            assert asyncio.run(partitions(broker.bootstrap_servers, "order-events")) >= 6
            stop_and_check_nothing_is_left(process, signal.SIGTERM)
            assert broker.process is not None
            assert broker.process.poll() is None  # not ours to stop
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def partitions(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()


def test_with_the_demo_orders_flow_until_delivered(tmp_path: Path) -> None:
    # A simulated day in ten seconds: handling 10 s, express transit 10 s, standard 30 s.
    process, base, text = start_dev(tmp_path, "--time-compression", "8640", "--demo-orders-per-minute", "60")
    try:
        assert "Ctrl-C stops everything" in text, text
        key = re.search(r"demo client key: (\S+)", text)
        assert key is not None, text
        intake, inventory, shipping = (f"http://127.0.0.1:{base + offset}" for offset in range(3))
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 240
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                orders = client.get(
                    f"{intake}/v1/orders", params={"limit": 200}, headers={"Authorization": f"Bearer {key[1]}"}
                )
                assert orders.status_code == 200, orders.text
                seen["orders"] = len(orders.json()["items"])
                seen["stock levels"] = len(client.get(f"{inventory}/v1/stock").json())
                for status in ("shipped", "delivered"):
                    page = client.get(f"{shipping}/v1/shipments", params={"status": status, "limit": 500}).json()
                    seen[status] = len(page["items"])
                if seen["orders"] and seen["stock levels"] and seen["delivered"]:
                    break
                time.sleep(2)
        log = (tmp_path / "data" / "logs" / "demo.log").read_text(errors="replace")
        assert seen.get("orders", 0) > 0, (seen, log[-3000:])
        assert seen.get("stock levels", 0) > 0, (seen, log[-3000:])
        assert seen.get("delivered", 0) > 0, (seen, log[-3000:])
        stop_and_check_nothing_is_left(process, signal.SIGTERM)
        assert "demo stopping" in (tmp_path / "data" / "logs" / "demo.log").read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _taken(port: int) -> bool:
    from fulfil.broker import port_open

    return port_open("127.0.0.1", port)
