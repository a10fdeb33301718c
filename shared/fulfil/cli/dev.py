"""``fulfil dev``: the whole stack on this machine, one process per service, and by
default the demo (``fulfil demo``: simulated customers, stockroom, warehouse and carrier)
as one more child process, so that ``make run`` shows orders flowing.

The demo needs an order-intake client key. fulfil dev gets one through order-intake's
documented dev interface, ``order_intake.cli.issue_dev_key(database_url, name)``, for a
client named ``demo`` (so the key the order-intake dev hook prints for ``dev`` stays
valid), and hands it to the demo in ``FULFIL_API_KEY``. Shipping runs with
``TIME_COMPRESSION`` equal to the demo's ``--time-compression``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import IO, Annotated

import httpx
import typer
from fulfil import kafka
from fulfil.broker import EmbeddedBroker, die_with_parent, port_open
from fulfil.settings import ServiceSettings
from rich.console import Console

console = Console()


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    app: str
    port_offset: int
    what: str

    @property
    def env_suffix(self) -> str:
        return self.name.upper().replace("-", "_")


SERVICES = (
    ServiceSpec("order-intake", "order_intake.main:create_app", 0, "ERP / shop order API and status timeline"),
    ServiceSpec("inventory", "inventory.main:create_app", 1, "stock, allocation, backorders"),
    ServiceSpec("shipping", "shipping.main:create_app", 2, "shipments, dispatch, carrier tracking, delays"),
    ServiceSpec("notifications", "notifications.main:create_app", 3, "customer notices by webhook and email"),
    ServiceSpec("kpi", "kpi.main:create_app", 4, "order-cycle and accuracy KPIs, dashboard"),
)


DEMO_CLIENT = "demo"
"""The order-intake client the demo places its orders as."""
DEMO_TIME_COMPRESSION = 1440.0
"""With the demo on, a simulated day takes a minute: dispatch, transit and delivery in minutes."""


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@dataclass
class Child:
    """A process fulfil dev started, owns, and stops."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


@dataclass
class RunningService(Child):
    spec: ServiceSpec
    url: str


def dev(
    base_port: Annotated[int, typer.Option(help="order-intake's port; the others follow")] = 8001,
    broker_port: Annotated[int, typer.Option(help="port of the embedded broker")] = 9092,
    host: Annotated[str, typer.Option(help="interface the services listen on")] = "127.0.0.1",
    data_dir: Annotated[Path, typer.Option(help="SQLite databases and logs")] = Path(".fulfil"),
    fresh: Annotated[bool, typer.Option(help="delete the data directory first")] = False,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for every /readyz")] = 90.0,
    demo: Annotated[
        bool, typer.Option(help="also run the demo: simulated customers, stockroom, warehouse and carrier")
    ] = True,
    time_compression: Annotated[
        float | None,
        typer.Option(
            min=1, help=f"simulated seconds per real second [default: {DEMO_TIME_COMPRESSION:g} with the demo, else 1]"
        ),
    ] = None,
    demo_orders_per_minute: Annotated[float, typer.Option(min=0, help="orders the demo places per real minute")] = 30,
) -> None:
    """Start the embedded broker, the five services and the demo; Ctrl-C stops them all."""
    compression = time_compression if time_compression is not None else (DEMO_TIME_COMPRESSION if demo else 1.0)
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker: EmbeddedBroker | None = None
    running: list[RunningService] = []
    demo_child: Child | None = None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if external:
            bootstrap = external
            console.print(f"broker: using KAFKA_BOOTSTRAP_SERVERS={external}")
        else:
            broker = EmbeddedBroker("127.0.0.1", broker_port, log_path=data_dir / "logs" / "broker.log")
            broker.start()
            bootstrap = broker.bootstrap_servers
            console.print(f"broker: embedded Tansu on {bootstrap} (in memory)")
        asyncio.run(kafka.ensure_topics(ServiceSettings(kafka_bootstrap_servers=bootstrap)))
        for spec in SERVICES:
            extra = {"TIME_COMPRESSION": f"{compression:g}"} if spec.name == "shipping" and compression != 1 else {}
            running.append(start_service(spec, host, base_port + spec.port_offset, bootstrap, data_dir, extra))
        wait_ready(running, ready_timeout)
        _print_urls(running, bootstrap, data_dir)
        _run_dev_hooks(running, data_dir)
        if demo:
            demo_child = _start_demo(running, data_dir, compression, demo_orders_per_minute)
        else:
            console.print("  demo off: `fulfil demo --help` runs the simulator by hand", highlight=False)
        console.print("[bold]Ctrl-C stops everything.[/bold]")
        demo_reported = False
        while True:
            for service in running:
                if service.process.poll() is not None:
                    console.print(
                        f"[red]{service.spec.name} exited with code {service.process.returncode}; "
                        f"see {service.log_path}[/red]"
                    )
                    raise _Stop("service exited")
            if demo_child is not None and not demo_reported and demo_child.process.poll() is not None:
                # The services are the system; the demo is only its traffic, so they keep running.
                console.print(
                    f"[yellow]demo exited with code {demo_child.process.returncode}; see {demo_child.log_path}[/yellow]"
                )
                demo_reported = True
            time.sleep(0.5)
    except _Stop:
        pass
    except Exception as exc:
        console.print(f"[red]fulfil dev failed: {exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        # A second Ctrl-C must not interrupt the shutdown half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The demo first, so it does not spend the services' shutdown failing requests.
        if demo_child is not None:
            stop_all([demo_child], timeout=5.0)
        stop_all(running)
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("stopped.")


def start_service(
    spec: ServiceSpec,
    host: str,
    port: int,
    bootstrap: str,
    data_dir: Path,
    extra_env: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    log_name: str | None = None,
) -> RunningService:
    """Start one service as a uvicorn child process logging to ``data_dir/logs/<log_name>.log``.

    ``environ`` is the environment the child inherits (default: ours); as in ``fulfil dev``,
    its DATABASE_URL is dropped and ``DATABASE_URL_<SERVICE>`` becomes the child's DATABASE_URL.
    ``log_name`` (default: the service's name) tells replicas of one service apart."""
    if port_open(host, port):
        raise RuntimeError(f"port {port} for {spec.name} is taken; use --base-port")
    inherited = os.environ if environ is None else environ
    log_path = data_dir / "logs" / f"{log_name or spec.name}.log"
    log_file = log_path.open("ab")
    env = {
        **inherited,
        "SERVICE_NAME": spec.name,
        "PORT": str(port),
        "HOST": host,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATA_DIR": str(data_dir),
        "ENVIRONMENT": inherited.get("ENVIRONMENT", "dev"),
        **extra_env,
    }
    if database_url := inherited.get(f"DATABASE_URL_{spec.env_suffix}"):
        env["DATABASE_URL"] = database_url
    else:
        env.pop("DATABASE_URL", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            spec.app,
            "--factory",
            "--host",
            host,
            "--port",
            str(port),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "5",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=die_with_parent,
    )
    return RunningService(
        name=spec.name, process=process, log_path=log_path, log_file=log_file, spec=spec, url=f"http://{host}:{port}"
    )


def _start_demo(running: list[RunningService], data_dir: Path, compression: float, per_minute: float) -> Child:
    """``fulfil demo`` against the services just started, as a child like them."""
    urls = {service.spec.name: service.url for service in running}
    log_path = data_dir / "logs" / "demo.log"
    env = {key: value for key, value in os.environ.items() if key != "FULFIL_API_KEY"}
    key = _demo_api_key(data_dir)
    if key is not None:
        env["FULFIL_API_KEY"] = key
    command = [
        sys.executable,
        "-m",
        "fulfil.cli",
        "demo",
        "--shipping-url",
        urls["shipping"],
        "--order-intake-url",
        urls["order-intake"],
        "--inventory-url",
        urls["inventory"],
        "--time-compression",
        f"{compression:g}",
        # The demo counts orders per simulated day; this keeps the real rate what was asked.
        "--orders-per-day",
        f"{per_minute * 1440 / compression:g}",
    ]
    child = start_child("demo", command, log_path, env)
    console.print(
        f"  demo: simulated customers, stockroom, warehouse and carrier, time x{compression:g}; log {log_path}",
        soft_wrap=True,
        highlight=False,
    )
    if key is not None:
        console.print(f"  demo client key: {key}", soft_wrap=True, highlight=False)
    return child


def start_child(name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> Child:
    """A child process logging to ``log_path`` that dies with us (``die_with_parent``)."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        preexec_fn=die_with_parent,
    )
    return Child(name=name, process=process, log_path=log_path, log_file=log_file)


def _demo_api_key(data_dir: Path) -> str | None:
    """A fresh key for the demo's order-intake client, through order-intake's dev interface
    ``order_intake.cli.issue_dev_key(database_url, name)``; None (no orders) if that fails."""
    database_url = os.environ.get("DATABASE_URL_ORDER_INTAKE")
    url = ServiceSettings.model_construct(
        service_name="order-intake", data_dir=str(data_dir), database_url=database_url
    ).database
    try:
        issue_dev_key = importlib.import_module("order_intake.cli").issue_dev_key
        _, key = issue_dev_key(url, DEMO_CLIENT)
    except Exception as exc:
        console.print(f"[yellow]no order-intake key for the demo, so no orders: {exc}[/yellow]")
        return None
    return str(key)


def wait_ready(running: Sequence[RunningService], timeout: float) -> None:
    """Wait until every service answers /readyz with 200; raise if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    waiting = list(running)
    with httpx.Client(timeout=2.0) as client:
        while waiting:
            for service in list(waiting):
                if service.process.poll() is not None:
                    tail = service.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{service.spec.name} exited during start-up:\n{tail}")
                try:
                    if client.get(f"{service.url}/readyz").status_code == 200:
                        waiting.remove(service)
                except httpx.HTTPError:
                    pass
            if waiting and time.monotonic() > deadline:
                raise TimeoutError("not ready in time: " + ", ".join(s.spec.name for s in waiting))
            if waiting:
                time.sleep(0.25)


def _print_urls(running: list[RunningService], bootstrap: str, data_dir: Path) -> None:
    # Plain lines, not a table: URLs must never be truncated to fit a narrow terminal.
    console.print("[bold]fulfil is running[/bold]")
    width = max(len(service.spec.name) for service in running)
    for service in running:
        console.print(
            f"  {service.spec.name:<{width}}  {service.url}  (docs {service.url}/docs)  {service.spec.what}",
            soft_wrap=True,
            highlight=False,
        )
    console.print(f"  broker {bootstrap} · databases and logs in {data_dir}/", soft_wrap=True, highlight=False)


def _run_dev_hooks(running: list[RunningService], data_dir: Path) -> None:
    """Services may print dev conveniences (an API key, a dashboard link) once all are up."""
    urls = {service.spec.name: service.url for service in running}
    for entry in entry_points(group="fulfil.dev_hooks"):
        try:
            entry.load()(urls=urls, data_dir=data_dir, console=console)
        except Exception as exc:
            console.print(f"[yellow]dev hook {entry.name} failed: {exc}[/yellow]")


def stop_all(children: Sequence[Child], timeout: float = 10.0) -> None:
    """SIGTERM every child, then SIGKILL those still running after ``timeout`` seconds; close their logs."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        child.log_file.close()


def broker(
    port: Annotated[int, typer.Option(help="port to listen on")] = 9092,
) -> None:
    """Run only the embedded broker (with the topics created) until Ctrl-C."""
    embedded = EmbeddedBroker("127.0.0.1", port)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        embedded.start()
        asyncio.run(kafka.ensure_topics(ServiceSettings(kafka_bootstrap_servers=embedded.bootstrap_servers)))
        console.print(f"Tansu listening on {embedded.bootstrap_servers}; Ctrl-C stops it.")
        while embedded.process is not None and embedded.process.poll() is None:
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        embedded.stop()
        signal.signal(signal.SIGTERM, previous)
