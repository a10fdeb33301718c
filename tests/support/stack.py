"""The whole stack as `make run` starts it, for end-to-end and fault tests.

The embedded Tansu broker on a free port, then each service as its own uvicorn process,
started by the same code `fulfil dev` uses (``fulfil.cli.dev.start_service`` and friends),
on free ports, with a temporary data directory (SQLite files and logs), or a fresh
PostgreSQL database per service. Services can be killed with SIGKILL, started again on
the same port, run as several replicas sharing one database, and everything is stopped
at the end with nothing left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fulfil import kafka
from fulfil.broker import EmbeddedBroker, free_port, port_open
from fulfil.cli import dev
from fulfil.settings import ServiceSettings
from fulfil.testing import POSTGRES_ADMIN_URL

SERVICE_NAMES: tuple[str, ...] = tuple(spec.name for spec in dev.SERVICES)
SPECS: dict[str, dev.ServiceSpec] = {spec.name: spec for spec in dev.SERVICES}
HOST = "127.0.0.1"

HARNESS_ENV: dict[str, str] = {
    # A killed member leaves its group after this long (the platform default is 10 s): like
    # tests/integration/test_fulfil_dev.py, so that fault tests recover within their bounds.
    "KAFKA_SESSION_TIMEOUT_MS": "3000",
}
"""What every service of a test stack gets beside what `fulfil dev` sets."""

_NOT_INHERITED = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "ENVIRONMENT")
"""Variables of the test runner's own environment that must not leak into the stack (a
developer's shell pointing at another broker or database, or at production)."""


def notifications_that_may_be_killed(smtp_url: str) -> dict[str, str]:
    """notifications' settings for tests that kill it: a delivery leased by a process that was
    killed is sent again after the lease (default 60 s); short attempts allow a short lease."""
    return {
        "SMTP_URL": smtp_url,
        "DELIVERY_LEASE_SECONDS": "6",
        "WEBHOOK_TIMEOUT_SECONDS": "4",
        "SMTP_TIMEOUT_SECONDS": "4",
    }


def instance_name(service: str, replica: int = 1) -> str:
    """``inventory`` for the first replica, ``inventory.2`` for the second, ..."""
    return service if replica == 1 else f"{service}.{replica}"


def service_of(instance: str) -> str:
    return instance.split(".", 1)[0]


@dataclass
class Stack:
    """Broker and services of one test; see the module docstring.

    ``database_urls`` maps a service to its DATABASE_URL (PostgreSQL); a service without
    one gets its SQLite file under ``data_dir`` as in `fulfil dev`. ``service_env`` adds
    environment variables per service (SMTP_URL, CARRIERS, ...), ``env`` for all of them."""

    data_dir: Path
    database_urls: Mapping[str, str] = field(default_factory=dict)
    service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    running: dict[str, dev.RunningService] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    stopped: list[dev.RunningService] = field(default_factory=list)

    # -- starting ------------------------------------------------------------------------

    def start(
        self,
        services: Iterable[str] = SERVICE_NAMES,
        *,
        replicas: Mapping[str, int] | None = None,
        ready_timeout: float = 90.0,
    ) -> None:
        """Broker, topics, then every service (and replica) at once; wait until all are ready."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedBroker(HOST, free_port(), log_path=self.data_dir / "logs" / "broker.log")
        self.broker.start()
        asyncio.run(kafka.ensure_topics(ServiceSettings(kafka_bootstrap_servers=self.bootstrap)))
        instances = [
            instance_name(service, n) for service in services for n in range(1, (replicas or {}).get(service, 1) + 1)
        ]
        for instance in instances:
            self._spawn(instance)
        self.wait_ready(instances, timeout=ready_timeout)

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None, "the stack is not started"
        return self.broker.bootstrap_servers

    def child_environment(self, service: str) -> dict[str, str]:
        """What ``start_service`` inherits for ``service``: our environment without a broker,
        database or ENVIRONMENT of its own, the harness defaults, and the service's database
        as DATABASE_URL_<SERVICE> (which `fulfil dev` hands over as DATABASE_URL)."""
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in _NOT_INHERITED and not key.startswith("DATABASE_URL_")
        }
        environ.update(HARNESS_ENV)
        environ.update(self.env)
        if service in self.database_urls:
            environ[f"DATABASE_URL_{SPECS[service].env_suffix}"] = self.database_urls[service]
        return environ

    def _spawn(self, instance: str) -> dev.RunningService:
        service = service_of(instance)
        port = self.ports.get(instance)
        if port is None:
            port = self.ports[instance] = free_port()
        running = dev.start_service(
            SPECS[service],
            HOST,
            port,
            self.bootstrap,
            self.data_dir,
            dict(self.service_env.get(service, {})),
            environ=self.child_environment(service),
            log_name=instance,
        )
        self.running[instance] = running
        return running

    def wait_ready(self, instances: Iterable[str], *, timeout: float = 60.0) -> None:
        dev.wait_ready([self.running[instance] for instance in instances], timeout)

    # -- faults ----------------------------------------------------------------------------

    def kill(self, instance: str) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed or committed."""
        running = self.running.pop(instance)
        running.process.send_signal(signal.SIGKILL)
        running.process.wait()
        running.log_file.close()
        self.stopped.append(running)

    def restart(self, instance: str, *, ready_timeout: float = 60.0) -> None:
        """Start a killed (or stopped) instance again on its port and wait until it is ready."""
        assert instance not in self.running, f"{instance} is still running"
        deadline = time.monotonic() + 10
        while port_open(HOST, self.ports[instance]) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._spawn(instance)
        self.wait_ready([instance], timeout=ready_timeout)

    def pause_broker(self) -> None:
        """SIGSTOP Tansu: connections stay open but nothing answers (a hung broker).

        Not a restart: the embedded Tansu keeps its log in memory, so a new process would
        start with empty topics and every offset the groups committed would be gone."""
        assert self.broker is not None
        assert self.broker.process is not None
        self.broker.process.send_signal(signal.SIGSTOP)

    def resume_broker(self) -> None:
        assert self.broker is not None
        assert self.broker.process is not None
        self.broker.process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def sqlite_locked(self, service: str) -> Iterator[None]:
        """Hold SQLite's write lock on the service's database (BEGIN EXCLUSIVE): its writers
        wait behind it (busy timeout) as behind a database that stopped answering writes."""
        connection = sqlite3.connect(self.sqlite_path(service), timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            connection.close()

    # -- looking at it ---------------------------------------------------------------------

    def url(self, instance: str) -> str:
        return f"http://{HOST}:{self.ports[instance]}"

    def database_url(self, service: str) -> str:
        """The service's database, as the running service sees it."""
        return ServiceSettings.model_construct(
            service_name=service, data_dir=str(self.data_dir), database_url=self.database_urls.get(service)
        ).database

    def sqlite_path(self, service: str) -> Path:
        url = self.database_url(service)
        assert url.startswith("sqlite"), f"{service} runs on {url}, not SQLite"
        return Path(url.split("///", 1)[1])

    def log(self, instance: str) -> str:
        return (self.data_dir / "logs" / f"{instance}.log").read_text(errors="replace")

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of every log, for assertion messages."""
        parts = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def metrics(self, instance: str) -> str:
        return httpx.get(f"{self.url(instance)}/metrics", timeout=10).text

    def pids(self) -> list[int]:
        pids = [running.process.pid for running in self.running.values()]
        if self.broker is not None and self.broker.process is not None:
            pids.append(self.broker.process.pid)
        return pids

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every service (SIGTERM, then SIGKILL) and the broker; leave no process behind."""
        if self.broker is not None and self.broker.process is not None:
            self.resume_broker()  # a paused broker would hold every service's shutdown up
        dev.stop_all(list(self.running.values()))
        self.stopped.extend(self.running.values())
        self.running.clear()
        if self.broker is not None:
            self.broker.stop()
        leftovers = [r.process.pid for r in self.stopped if r.process.poll() is None]
        assert leftovers == [], f"processes still running after stop: {leftovers}"


# -- PostgreSQL: a fresh database per service ---------------------------------------------


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _admin(*statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(_plain_dsn(POSTGRES_ADMIN_URL), timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def postgres_databases(services: Iterable[str]) -> Iterator[dict[str, str]]:
    """One new database per service on the test PostgreSQL (``POSTGRES_ADMIN_URL``), as
    DATABASE_URLs; every one is dropped afterwards, connections or not."""
    names = {service: f"fulfil_e2e_{service.replace('-', '_')}_{uuid.uuid4().hex[:8]}" for service in services}
    asyncio.run(_admin(*(f'CREATE DATABASE "{name}"' for name in names.values())))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield {service: f"{base}/{name}" for service, name in names.items()}
    finally:
        asyncio.run(_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values())))


def api_key(stack: Stack, client_name: str) -> str:
    """An order-intake API key for a new client, through order-intake's dev interface."""
    from order_intake.cli import issue_dev_key

    _, key = issue_dev_key(stack.database_url("order-intake"), client_name)
    return str(key)


@dataclass
class CallLog:
    """Every HTTP answer a test got from the stack, to check which statuses faults produced."""

    answers: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    """(method, url, status, Retry-After)."""
    connection_errors: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, response: httpx.Response) -> None:
        request = response.request
        self.answers.append(
            (request.method, str(request.url), response.status_code, response.headers.get("retry-after"))
        )

    def server_errors(self) -> list[tuple[str, str, int, str | None]]:
        """5xx answers other than 503 with Retry-After (the one a client is told to retry)."""
        return [a for a in self.answers if a[2] >= 500 and not (a[2] == 503 and a[3])]

    def client(self, **options: Any) -> httpx.Client:
        return httpx.Client(event_hooks={"response": [self.record]}, **options)
