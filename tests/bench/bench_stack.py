"""The whole stack under load, started the way `make run` starts it (embedded Tansu, five
uvicorn processes on SQLite) with the simulated warehouse and carrier dispatching and
delivering every shipment, a real webhook receiver and a real SMTP server.

Orders are posted open-loop at increasing rates, one step per rate. For each step:
- whether the stack kept up: every order of the step was counted by the KPI service and
  its confirmation webhook arrived within DRAIN_SECONDS after the step ended;
- the consumer lag the services report (``fulfil_consumer_lag_records``, summed over groups and partitions);
- p50/p99 of POST -> confirmation webhook received, and of POST -> the KPI service
  counting the order (the first poll of ``/v1/kpis`` whose received-order count reached
  the order's position in the stream, polled every POLL_SECONDS);
- each process's CPU share (CPU seconds per wall second, from /proc).
The highest rate that kept up is the sustained rate. The baseline, in the same run on the
same broker: raw aiokafka producing CloudEvents records (bench_foundation's raw figure),
compared as events per second.

python -m tests.bench bench_stack     (BENCH_STACK_RATES=10,20,40,80  BENCH_STACK_STEP_SECONDS=15)
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from fulfil.broker import port_open
from fulfil.cli import dev

from tests.bench.bench_foundation import raw_produce
from tests.support.flows import bearer, order_body
from tests.support.orders import order_received
from tests.support.receivers import MailReceiver, WebhookReceiver
from tests.support.stack import Stack, api_key

RATES = [float(rate) for rate in os.environ.get("BENCH_STACK_RATES", "10,20,40,80").split(",")]
STEP_SECONDS = float(os.environ.get("BENCH_STACK_STEP_SECONDS", "15"))
RAW_EVENTS = int(os.environ.get("BENCH_STACK_RAW_EVENTS", "5000"))
DRAIN_SECONDS = 5.0
POLL_SECONDS = 0.1
TIME_COMPRESSION = 17_280.0
"""A simulated day in five seconds: handling (24 h) and transit (days) take seconds."""
SKUS = [f"LOAD-{n:02d}" for n in range(20)]
CUSTOMERS = [f"LOAD-C{n:02d}" for n in range(10)]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Posted:
    order_id: str
    posted_at: float
    """time.time() when the POST was sent."""
    position: int
    """1 for the first order of the run, 2 for the second..."""


@dataclass
class Step:
    rate: float
    posted: list[Posted] = field(default_factory=list)
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    """Requests that got no answer (a connection refused or dropped)."""
    lag_max: int = 0
    lag_after: int = 0
    kept_up: bool = False
    webhook_seconds: list[float] = field(default_factory=list)
    kpi_seconds: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def processes(stack: Stack, simulator: dev.Child) -> dict[str, int]:
    pids = {name: service.process.pid for name, service in stack.running.items()}
    assert stack.broker is not None
    assert stack.broker.process is not None
    pids["broker"] = stack.broker.process.pid
    pids["simulator"] = simulator.process.pid
    return pids


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def consumer_lag(http: httpx.AsyncClient, stack: Stack) -> int:
    total = 0
    for name in stack.running:
        try:
            text = (await http.get(f"{stack.url(name)}/metrics")).text
        except httpx.TransportError:
            continue  # the step records what the order API said; a dead service shows there and in its log
        for line in text.splitlines():
            if line.startswith("fulfil_consumer_lag_records{"):
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def kpi_orders(http: httpx.AsyncClient, kpi: str) -> int:
    report = (await http.get(f"{kpi}/v1/kpis", params={"window": "all"})).json()
    return int(report["overall"]["orders_received"])


async def topic_records(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


class Load:
    def __init__(self, stack: Stack, hooks: WebhookReceiver, key: str) -> None:
        self.stack = stack
        self.hooks = hooks
        self.key = key
        self.http = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200))
        self.position = 0
        self.kpi_counts: list[tuple[float, int]] = []
        """(time.time(), orders the KPI service counted), polled throughout."""

    async def prepare(self) -> None:
        inventory = self.stack.url("inventory")
        warehouse = {"name": "Load DC", "country": "CN", "handling_hours": 24, "priority": 1}
        (await self.http.put(f"{inventory}/v1/warehouses/WH-LOAD", json=warehouse)).raise_for_status()
        for sku in SKUS:
            stock = {"on_hand": 1_000_000}
            (await self.http.put(f"{inventory}/v1/stock/WH-LOAD/{sku}", json=stock)).raise_for_status()
        notifications = self.stack.url("notifications")
        for customer in CUSTOMERS:
            preferences = {"webhook_url": self.hooks.url_for(customer), "events": ["order.received"]}
            url = f"{notifications}/v1/customers/{customer}/preferences"
            (await self.http.put(url, json=preferences)).raise_for_status()

    async def watch_kpi(self) -> None:
        kpi = self.stack.url("kpi")
        while True:
            started = time.time()
            try:
                self.kpi_counts.append((started, await kpi_orders(self.http, kpi)))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(max(0.0, POLL_SECONDS - (time.time() - started)))

    async def post(self, step: Step) -> None:
        self.position += 1
        position = self.position
        customer = CUSTOMERS[position % len(CUSTOMERS)]
        body = order_body(f"LOAD-{position:06d}", customer, [(SKUS[position % len(SKUS)], 1 + position % 3)])
        headers = {**bearer(self.key), "Idempotency-Key": body["external_ref"]}
        posted_at = time.time()
        try:
            response = await self.http.post(f"{self.stack.url('order-intake')}/v1/orders", json=body, headers=headers)
        except httpx.TransportError as exc:
            step.errors.append(repr(exc))
            return
        if response.status_code == 201:
            step.posted.append(Posted(response.json()["order_id"], posted_at, position))
        else:
            step.refused += 1

    async def run_step(self, step: Step, pids: dict[str, int]) -> None:
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own_before = own_cpu_seconds()
        started = time.monotonic()
        requests: list[asyncio.Task[None]] = []
        count = int(step.rate * STEP_SECONDS)
        for index in range(count):
            await asyncio.sleep(max(0.0, started + index / step.rate - time.monotonic()))
            requests.append(asyncio.create_task(self.post(step)))
            if index % max(1, int(step.rate)) == 0:
                step.lag_max = max(step.lag_max, await consumer_lag(self.http, self.stack))
        await asyncio.gather(*requests)
        elapsed = time.monotonic() - started
        step.cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in pids.items()}
        step.cpu["load generator"] = (own_cpu_seconds() - own_before) / elapsed
        # Kept up: everything posted is counted and confirmed soon after the step ends.
        ids = {posted.order_id for posted in step.posted}
        last = max((posted.position for posted in step.posted), default=0)
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            counted = self.kpi_counts[-1][1] if self.kpi_counts else 0
            if counted >= last and ids <= self.confirmed().keys():
                step.kept_up = True
                break
            await asyncio.sleep(POLL_SECONDS)
        step.lag_after = await consumer_lag(self.http, self.stack)
        confirmed = self.confirmed()
        for posted in step.posted:
            if posted.order_id in confirmed:
                step.webhook_seconds.append(confirmed[posted.order_id] - posted.posted_at)
            counted_at = next((at for at, count in self.kpi_counts if count >= posted.position), None)
            if counted_at is not None:
                step.kpi_seconds.append(max(0.0, counted_at - posted.posted_at))

    def confirmed(self) -> dict[str, float]:
        """order_id -> when its confirmation webhook arrived (time.time())."""
        arrivals: dict[str, float] = {}
        for hook in self.hooks.snapshot():
            payload = json.loads(hook.body)
            if payload.get("type") == "order.received":
                arrivals.setdefault(payload["data"]["order_id"], hook.received_at.timestamp())
        return arrivals


def start_simulator(stack: Stack) -> dev.Child:
    log_path = stack.data_dir / "logs" / "simulator.log"
    command = [
        sys.executable,
        "-m",
        "fulfil.cli",
        "demo",
        "--shipping-url",
        stack.url("shipping"),
        "--no-stock",
        "--time-compression",
        f"{TIME_COMPRESSION:g}",
        "--interval",
        "0.2",
        "--seed",
        "7",
    ]
    # No FULFIL_API_KEY: the simulator places no orders of its own, the load generator does.
    env = {key: value for key, value in os.environ.items() if key != "FULFIL_API_KEY"}
    return dev.start_child("simulator", command, log_path, env)


async def run() -> None:
    with tempfile.TemporaryDirectory() as tmp, WebhookReceiver() as hooks, MailReceiver() as mail:
        stack = Stack(
            Path(tmp),
            service_env={
                "shipping": {"TIME_COMPRESSION": f"{TIME_COMPRESSION:g}"},
                "notifications": {"SMTP_URL": mail.smtp_url},
            },
        )
        simulator: dev.Child | None = None
        try:
            await asyncio.to_thread(stack.start)  # it runs an event loop of its own
            raw_topic = f"raw-{uuid.uuid4().hex[:8]}"
            raw_events = [order_received(f"raw-{i}") for i in range(RAW_EVENTS)]
            raw_rate = await raw_produce(stack.bootstrap, raw_topic, raw_events)
            load = Load(stack, hooks, await asyncio.to_thread(api_key, stack, "load"))
            await load.prepare()
            simulator = start_simulator(stack)
            pids = processes(stack, simulator)
            watcher = asyncio.create_task(load.watch_kpi())
            steps: list[Step] = []
            try:
                for rate in RATES:
                    step = Step(rate)
                    await load.run_step(step, pids)
                    steps.append(step)
                    if not step.kept_up or step.errors:
                        break
            finally:
                watcher.cancel()
                await load.http.aclose()
            records = await topic_records(stack.bootstrap, "order-events")
            posted = sum(len(step.posted) for step in steps)
            report(steps, raw_rate, records / max(1, posted))
        except BaseException:
            print(stack.logs_tail())
            raise
        finally:
            if simulator is not None:
                dev.stop_all([simulator], timeout=5.0)
            stack.stop()
            assert all(not port_open("127.0.0.1", port) for port in stack.ports.values())


def report(steps: list[Step], raw_rate: float, events_per_order: float) -> None:
    print(f"raw aiokafka produce on the same broker: {raw_rate:,.0f} events/s")
    print(f"events on order-events per order (whole run): {events_per_order:.1f}")
    for step in steps:
        verdict = "kept up" if step.kept_up and not step.errors else "fell behind"
        print(
            f"  {step.rate:5.1f} orders/s offered, {len(step.posted) / STEP_SECONDS:5.1f} accepted/s "
            f"({step.refused} refused, {len(step.errors)} unanswered): {verdict}; "
            f"lag max {step.lag_max}, after drain {step.lag_after}"
        )
        print(
            f"        POST -> webhook p50 {percentile(step.webhook_seconds, 0.5) * 1000:7.0f} ms  "
            f"p99 {percentile(step.webhook_seconds, 0.99) * 1000:7.0f} ms   "
            f"POST -> KPI p50 {percentile(step.kpi_seconds, 0.5) * 1000:7.0f} ms  "
            f"p99 {percentile(step.kpi_seconds, 0.99) * 1000:7.0f} ms"
        )
        shares = ", ".join(f"{name} {share:.2f}" for name, share in sorted(step.cpu.items(), key=lambda kv: -kv[1]))
        print(f"        CPU (cores used): {shares}; total {sum(step.cpu.values()):.2f} of {os.cpu_count()}")
    sustained = [step.rate for step in steps if step.kept_up and not step.errors]
    if sustained:
        best = max(sustained)
        events = best * events_per_order
        print(
            f"sustained: {best:g} orders/s, about {events:,.0f} events/s through the broker = "
            f"{events / raw_rate:.3f} x raw aiokafka produce ({raw_rate:,.0f}/s)"
        )
    else:
        print("sustained: none of the offered rates kept up")
