"""POST /v1/orders with durable commit against a bare FastAPI endpoint that only validates
OrderCreate, both under uvicorn in their own process, driven by the same httpx load script
in the same run; then the batch endpoint.

python -m tests.bench bench_order_intake
    BENCH_REQUESTS (per round, default 1500), BENCH_CONCURRENCY (64), BENCH_ROUNDS (at most 3,
    fewer once BENCH_SECONDS (40) of rounds have passed), BENCH_BATCHES (10 batches of 1,000 orders)

Each round measures the bare endpoint and order-intake back to back (which goes first
alternates), so the ratio compares the two under the same machine load; this machine is
shared, so absolute numbers wander. Server CPU per request is reported too: it depends
far less on what else the machine is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from fastapi import FastAPI
from fulfil import db, kafka
from fulfil.broker import EmbeddedBroker, free_port
from fulfil.settings import ServiceSettings
from order_intake import service
from order_intake.domain import OrderStatus
from order_intake.models import IntakeTable, Order, OrderAccepted, OrderCreate
from sqlmodel import func, select

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "1500"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "40"))
BATCHES = int(os.environ.get("BENCH_BATCHES", "10"))
BATCH_SIZE = 1000
WARMUP = 300
REPO = Path(__file__).resolve().parents[2]

# httpcore tries ``import sniffio`` for every lock it creates; sniffio is not installed here, and a
# failed import is not cached, so each attempt searches sys.path: about 0.5 ms of load-script CPU
# per request. None in sys.modules makes the import fail at once (httpcore then assumes asyncio).
sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


def bare_app() -> FastAPI:
    """The ceiling: the same body model validated, the same response shape, nothing stored."""
    app = FastAPI()

    @app.post("/v1/orders", status_code=201, response_model=OrderAccepted)
    async def create_order(body: OrderCreate) -> OrderAccepted:
        order_id = f"ord_{uuid.uuid4().hex}"
        accepted = {"order_id": order_id, "external_ref": body.external_ref, "status": OrderStatus.RECEIVED}
        return OrderAccepted(**accepted, links=service.links(order_id))

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def order_json(external_ref: str) -> dict[str, Any]:
    return {
        "external_ref": external_ref,
        "customer": {"id": "C-1001", "tier": "core", "locale": "zh-CN", "email": "li.wei@example.cn"},
        "lines": [
            {"line_no": 1, "sku": "TEA-OOLONG-250G", "qty": 4, "substitutes": ["TEA-OOLONG-500G"]},
            {"line_no": 2, "sku": "CUP-CERAMIC-01", "qty": 2},
        ],
        "ship_to": {
            "name": "Li Wei",
            "line1": "88 Century Avenue",
            "city": "Shanghai",
            "postal_code": "200120",
            "country": "CN",
        },
        "service_level": "express",
    }


def bodies(prefix: str, count: int) -> Iterator[bytes]:
    """Pre-encoded bodies with unique external_refs, so the load script spends little CPU on them."""
    return (json.dumps(order_json(f"{prefix}-{i}")).encode() for i in range(count))


@dataclass(frozen=True)
class Server:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User and system CPU the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    statuses: Counter[int | str]
    p50_ms: float
    p99_ms: float
    client_cpu: float
    """Share of one core the load script used: near 100% means the client, not the server, was the limit."""
    server_cpu_ms: float
    """Server CPU per request: what throughput would be on a quiet core, whatever else runs here."""

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


class Connections:
    """``concurrency`` httpx clients of one keep-alive connection each, one per load worker.

    Not one client with a pool of ``concurrency`` connections: httpcore's pool scans every
    connection for every waiting request, so the slower the server, the more CPU the load
    script itself burns per request, and it becomes the limit it is meant to measure."""

    def __init__(self, base: str, key: str | None = None, concurrency: int = CONCURRENCY) -> None:
        headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.clients = [
            httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) for _ in range(concurrency)
        ]

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*[http.aclose() for http in self.clients])


async def drive(connections: Connections, server: Server, path: str, payloads: list[bytes]) -> Load:
    """Post every payload, one request in flight per connection; latency of each."""
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    pending = iter(payloads)

    async def worker(http: httpx.AsyncClient) -> None:
        for payload in pending:  # one shared iterator: each payload is posted once
            started = time.perf_counter()
            try:
                response = await http.post(path, content=payload)
            except httpx.TransportError as exc:
                statuses[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1

    cpu, wall, server_cpu = time.process_time(), time.perf_counter(), server.cpu_seconds()
    await asyncio.gather(*[worker(http) for http in connections.clients])
    seconds = time.perf_counter() - wall
    quantiles = statistics.quantiles(latencies, n=100)
    return Load(
        len(payloads),
        seconds,
        statuses,
        quantiles[49] * 1000,
        quantiles[98] * 1000,
        (time.process_time() - cpu) / seconds,
        (server.cpu_seconds() - server_cpu) * 1000 / len(payloads),
    )


def start_uvicorn(app: str, port: int, env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        # Keep-alive longer than any pause between rounds, so no pooled connection goes stale.
        [*command, "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", "300"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def uvicorn_server(app: str, env: dict[str, str], log: Path) -> AsyncIterator[Server]:
    """``app`` (a factory) under uvicorn in its own process on a free port; its base URL."""
    port = free_port()
    with log.open("wb") as log_file:
        process = start_uvicorn(app, port, env, log_file)
        base = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(base, process, log)
            yield Server(base, process.pid)
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2) as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{base} exited during start-up:\n{log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base} not ready within {timeout}s")
            await asyncio.sleep(0.2)


async def new_client_key(database_url: str) -> str:
    engine = db.create_engine(database_url)
    try:
        await db.create_tables(engine, [IntakeTable.metadata])
        async with db.session_factory(engine)() as session:
            _, key = await service.create_client(session, "bench", service.system_clock())
        return key
    finally:
        await engine.dispose()


async def stored_orders(database_url: str) -> int:
    engine = db.create_engine(database_url)
    try:
        async with db.session_factory(engine)() as session:
            return int((await session.exec(select(func.count()).select_from(Order))).one())
    finally:
        await engine.dispose()


async def group_commits(http: httpx.AsyncClient) -> tuple[float, float, float]:
    """(transactions, orders, seconds) the service's group commit has done so far, from /metrics."""
    text = (await http.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("fulfil_order_intake_group_commit_"):
            values[name] = float(value)
    return (
        values.get("fulfil_order_intake_group_commit_orders_count", 0.0),
        values.get("fulfil_order_intake_group_commit_orders_sum", 0.0),
        values.get("fulfil_order_intake_group_commit_seconds_sum", 0.0),
    )


async def drive_intake(
    connections: Connections, server: Server, payloads: list[bytes]
) -> tuple[Load, tuple[float, ...]]:
    """The load, and the group commits (transactions, orders, seconds) it caused."""
    before = await group_commits(connections.clients[0])
    load = await drive(connections, server, "/v1/orders", payloads)
    after = await group_commits(connections.clients[0])
    return load, tuple(a - b for a, b in zip(after, before, strict=True))


def show(name: str, load: Load) -> None:
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(load.statuses.items(), key=str))
    print(
        f"  {name:<13} {load.per_second:>8,.0f} req/s   p50 {load.p50_ms:6.1f} ms   p99 {load.p99_ms:6.1f} ms"
        f"   server CPU {load.server_cpu_ms:5.2f} ms/req   load-script CPU {load.client_cpu:.0%}   ({statuses})"
    )


async def run() -> None:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            await run_against(broker.bootstrap_servers, Path(directory))
    finally:
        broker.stop()


async def run_against(bootstrap: str, directory: Path) -> None:
    topic = f"bench-intake-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(
        ServiceSettings(kafka_bootstrap_servers=bootstrap, kafka_topic=topic, kafka_dlq_topic=f"{topic}.dlq")
    )
    database_url = f"sqlite+aiosqlite:///{directory}/order-intake.db"
    key = await new_client_key(database_url)
    intake_env = {
        "SERVICE_NAME": "order-intake",
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "LOG_LEVEL": "WARNING",
        # The benchmark is one client at full speed: lift its token bucket out of the way.
        "RATE_LIMIT_PER_SECOND": "1000000000",
        "RATE_LIMIT_BURST": "1000000000",
    }
    print(
        f"SQLite, {CONCURRENCY} requests in flight, {REQUESTS} requests per round after {WARMUP} warm-up, "
        f"up to {ROUNDS} rounds; Tansu broker; order-intake runs its relay and consumer as in production"
    )
    async with (
        uvicorn_server("tests.bench.bench_order_intake:bare_app", {}, directory / "bare.log") as bare_server,
        uvicorn_server("order_intake.main:create_app", intake_env, directory / "intake.log") as intake_server,
        Connections(bare_server.url) as bare,
        Connections(intake_server.url, key) as intake,
    ):
        await drive(bare, bare_server, "/v1/orders", list(bodies("warm-bare", WARMUP)))
        warm = await drive(intake, intake_server, "/v1/orders", list(bodies("warm", WARMUP)))
        posted = warm.statuses[201]
        ratios, cpu_ratios = [], []
        started = time.monotonic()
        for round_no in range(ROUNDS):
            if round_no and time.monotonic() - started > SECONDS:
                break
            print(f" round {round_no + 1}")
            bare_payloads = list(bodies(f"bare-{round_no}", REQUESTS))
            intake_payloads = list(bodies(f"r{round_no}", REQUESTS))
            if round_no % 2:
                intake_load, commits = await drive_intake(intake, intake_server, intake_payloads)
                bare_load = await drive(bare, bare_server, "/v1/orders", bare_payloads)
            else:
                bare_load = await drive(bare, bare_server, "/v1/orders", bare_payloads)
                intake_load, commits = await drive_intake(intake, intake_server, intake_payloads)
            show("bare FastAPI", bare_load)
            show("order-intake", intake_load)
            transactions, orders, seconds = commits
            print(
                f"  group commit   {orders / max(transactions, 1):.1f} orders per transaction on average, "
                f"{seconds * 1000 / max(transactions, 1):.1f} ms per transaction"
            )
            posted += intake_load.statuses[201]
            ratios.append(intake_load.per_second / bare_load.per_second)
            cpu_ratios.append(bare_load.server_cpu_ms / intake_load.server_cpu_ms)
            print(f"  ratio          {ratios[-1]:.0%} of the bare endpoint's requests/s ({cpu_ratios[-1]:.0%} by CPU)")
        print(
            f"  POST /v1/orders / bare endpoint = {statistics.median(ratios):.0%} of its requests/s, "
            f"{statistics.median(cpu_ratios):.0%} by server CPU per request (medians of rounds; aim >= 50%)"
        )

        batch_payloads = [
            json.dumps({"orders": [order_json(f"batch-{b}-{i}") for i in range(BATCH_SIZE)]}).encode()
            for b in range(BATCHES)
        ]
        async with Connections(intake_server.url, key, concurrency=2) as batch_connections:
            batch = await drive(batch_connections, intake_server, "/v1/orders/batch", batch_payloads)
        created = batch.statuses[207] * BATCH_SIZE  # every order of every batch is new
        print(
            f"  batch: {BATCHES} x {BATCH_SIZE} orders, 2 in flight: {created / batch.seconds:,.0f} orders/s "
            f"(p50 {batch.p50_ms:.0f} ms per batch, server CPU {batch.server_cpu_ms / BATCH_SIZE * 1000:.0f} µs/order; "
            "aim >= 10,000 orders/s)"
        )
        posted += created
    stored = await stored_orders(database_url)
    print(f"  durable: {stored} orders stored for {posted} accepted ({'ok' if stored == posted else 'MISMATCH'})")
