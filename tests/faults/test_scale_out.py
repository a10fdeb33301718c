"""Scale-out: two replicas of inventory and two of notifications, each pair in one consumer
group on one shared database (PostgreSQL when it answers, else one SQLite file in WAL mode
shared by both processes). Partitions are shared between the replicas, nothing is done twice,
stock is never over-allocated, and when one replica of each is SIGKILLed its partitions move to
the other with nothing lost.

Stock is short on purpose (demand is about twice what is on hand), so replicas race for the
same stock rows: only the database's conditional updates keep them from over-allocating.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fulfil.testing import postgres_unreachable_reason
from prometheus_client.parser import text_string_to_metric_families

from tests.support.flows import bearer, ok, order_body, orders, subscribe_webhook, wait_for
from tests.support.receivers import MailReceiver, WebhookReceiver
from tests.support.stack import (
    CallLog,
    Stack,
    api_key,
    instance_name,
    notifications_that_may_be_killed,
    postgres_databases,
)
from tests.support.traffic import Accepted, OrderStream

pytestmark = pytest.mark.slow

SCALED = ("inventory", "notifications")
SERVICES = ("order-intake", *SCALED)
STOCK = {("WH-1", "SKU-X"): 60, ("WH-2", "SKU-Y"): 40, ("WH-2", "SKU-X"): 20}
CUSTOMERS = [f"S-{n}" for n in range(8)]
WEBHOOK_CUSTOMERS = CUSTOMERS[::2]
SHARED_PHASE_ORDERS = 60
TOTAL_ORDERS = 140
ORDERS_PER_SECOND = 8.0


def order_for(index: int) -> dict[str, Any]:
    customer = CUSTOMERS[index % len(CUSTOMERS)]
    sku = "SKU-X" if index % 3 else "SKU-Y"
    lines = [(sku, 1 + index % 2)] if index % 5 else [("SKU-X", 1), ("SKU-Y", 1)]
    return order_body(f"SCALE-{index:04d}", customer, lines, email=f"{customer.lower()}@example.com")


@pytest.fixture
def shared_databases() -> Iterator[dict[str, str]]:
    """PostgreSQL databases when PostgreSQL answers; otherwise SQLite (replicas share the file)."""
    reason = asyncio.run(postgres_unreachable_reason())
    if reason is not None:
        print(f"PostgreSQL does not answer ({reason}): replicas share SQLite files (WAL)")
        yield {}
        return
    with postgres_databases(SERVICES) as urls:
        yield urls


def samples(metrics: str, name: str, group: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric of one consumer group, in Prometheus' text format."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and sample.labels.get("group") == group
    ]


def partitions_applied(metrics: str, group: str) -> set[int]:
    """Partitions this process applied records from (its consumer-lag gauge has one series per partition)."""
    return {int(labels["partition"]) for labels, _ in samples(metrics, "fulfil_consumer_lag_records", group)}


def events_applied(metrics: str, group: str) -> int:
    return int(sum(value for _, value in samples(metrics, "fulfil_events_applied_total", group)))


def test_two_replicas_share_partitions_never_double_apply_or_over_allocate_and_survive_a_kill(
    tmp_path: Path, shared_databases: dict[str, str]
) -> None:
    with MailReceiver() as mail, WebhookReceiver() as hooks:
        stack = Stack(
            tmp_path / "data",
            database_urls=shared_databases,
            service_env={"notifications": notifications_that_may_be_killed(mail.smtp_url)},
        )
        try:
            stack.start(SERVICES, replicas={service: 2 for service in SCALED})
            scale_out(stack, mail, hooks, backend="postgresql" if shared_databases else "sqlite")
        except BaseException:
            print(stack.logs_tail())
            raise
        finally:
            stack.stop()


def scale_out(stack: Stack, mail: MailReceiver, hooks: WebhookReceiver, *, backend: str) -> None:
    intake, inventory = stack.url("order-intake"), stack.url("inventory")
    key = api_key(stack, "erp-scale")
    calls = CallLog()
    secrets: dict[str, str] = {}
    with calls.client(timeout=30) as http:
        for warehouse, priority in (("WH-1", 1), ("WH-2", 2)):
            body = {"name": warehouse, "country": "CN", "handling_hours": 24, "priority": priority}
            ok(http.put(f"{inventory}/v1/warehouses/{warehouse}", json=body))
        for (warehouse, sku), on_hand in STOCK.items():
            # Through the second replica: both serve the same database.
            ok(http.put(f"{stack.url('inventory.2')}/v1/stock/{warehouse}/{sku}", json={"on_hand": on_hand}))
        for n, customer in enumerate(WEBHOOK_CUSTOMERS):
            replica = instance_name("notifications", 1 + n % 2)
            secrets[customer] = subscribe_webhook(http, stack.url(replica), customer, hooks.url_for(customer))

    stream = OrderStream(intake, key, order_for, calls, rate=ORDERS_PER_SECOND, limit=TOTAL_ORDERS)
    stream.start()
    try:
        stream.wait_for(SHARED_PHASE_ORDERS)

        # Both replicas of each service take part: each applied records, from partitions of its own.
        def shared() -> dict[str, dict[int, set[int]]] | None:
            seen: dict[str, dict[int, set[int]]] = {}
            for service in SCALED:
                seen[service] = {
                    n: partitions_applied(stack.metrics(instance_name(service, n)), service) for n in (1, 2)
                }
            return seen if all(all(parts.values()) for parts in seen.values()) else None

        before_kill = wait_for(shared, timeout=60, interval=1.0, what="both replicas of each service applying")
        duplicates_while_shared = {i: c for i, c in hooks.ids().items() if c > 1}
        applied_before_kill = {
            service: {n: events_applied(stack.metrics(instance_name(service, n)), service) for n in (1, 2)}
            for service in SCALED
        }
        assert all(all(applied.values()) for applied in applied_before_kill.values()), applied_before_kill
        for service in SCALED:
            stack.kill(instance_name(service, 1))
        killed_at = time.monotonic()
        # Orders keep coming, to every partition: the killed replicas' ones too.
        stream.wait_for(TOTAL_ORDERS, timeout=90)
    finally:
        accepted = stream.stop()

    with calls.client(timeout=30) as http:
        expect = ScaleExpectation(accepted)
        wait_for(
            lambda: expect.settled(stack, http, key, mail, hooks),
            timeout=120,
            interval=1.0,
            what="every order allocated or backordered and notified, by the surviving replicas",
            state=lambda: expect.progress,
        )
        settled_after_kill = time.monotonic() - killed_at
        time.sleep(2)  # anything applied twice would show now
        moved = {service: partitions_applied(stack.metrics(instance_name(service, 2)), service) for service in SCALED}
        counts = expect.reconcile(stack, http, key, mail, hooks, secrets)

    for service in SCALED:
        # The survivor applied records of the partitions the killed replica had.
        assert before_kill[service][1] <= moved[service], (service, before_kill[service], moved[service])
    assert duplicates_while_shared == {}, duplicates_while_shared
    assert calls.server_errors() == []

    print(f"\nscale-out run ({backend}):")
    for service in SCALED:
        print(
            f"  {service}: partitions applied by replica 1 / 2 before the kill: "
            f"{sorted(before_kill[service][1])} / {sorted(before_kill[service][2])}; "
            f"events applied {applied_before_kill[service][1]} / {applied_before_kill[service][2]}; "
            f"replica 2 after the kill: {sorted(moved[service])}"
        )
    print(f"  orders accepted: {len(accepted)} ({SHARED_PHASE_ORDERS}+ before the kill)")
    print(f"  settled after the kill (s): {settled_after_kill:.1f}")
    for name, value in counts.items():
        print(f"  {name}: {value}")


class ScaleExpectation:
    def __init__(self, accepted: list[Accepted]) -> None:
        self.orders = {order.order_id: order for order in accepted}
        assert len(self.orders) == len(accepted)
        self.demand = Counter[str]()
        for order in accepted:
            for line in order.body["lines"]:
                self.demand[line["sku"]] += line["qty"]
        self.progress: dict[str, Any] = {}

    def expected_deliveries(self, backordered: set[str]) -> Counter[tuple[str, str]]:
        wanted = Counter[tuple[str, str]]()
        for order_id, order in self.orders.items():
            customer = order.body["customer"]["id"]
            notices = 2 if order_id in backordered else 1
            wanted[(customer, "email")] += notices
            if customer in WEBHOOK_CUSTOMERS:
                wanted[(customer, "webhook")] += notices
        return wanted

    def timelines(self, stack: Stack, http: Any, key: str) -> dict[str, list[dict[str, Any]]]:
        return {
            order_id: ok(http.get(f"{stack.url('order-intake')}/v1/orders/{order_id}", headers=bearer(key)))["timeline"]
            for order_id in self.orders
        }

    def settled(self, stack: Stack, http: Any, key: str, mail: MailReceiver, hooks: WebhookReceiver) -> bool:
        """Every order decided (covered, or waiting in the queue for the rest) and every notice sent."""
        statuses = Counter(o["status"] for o in orders(http, stack.url("order-intake"), key))
        undecided = statuses.get("received", 0) + len(self.orders) - sum(statuses.values())
        reserved = sum(r["reserved"] for r in ok(http.get(f"{stack.url('inventory.2')}/v1/stock")))
        waiting = sum(b["qty"] for b in ok(http.get(f"{stack.url('inventory.2')}/v1/backorders")))
        rows = self.delivery_rows(stack, http)
        sent = sum(1 for d in rows if d["status"] == "delivered")
        self.progress = {
            "order statuses": dict(statuses),
            "units reserved + waiting / demanded": (reserved + waiting, sum(self.demand.values())),
            "deliveries delivered / queued": (sent, len(rows)),
            "webhooks / emails received": (len(hooks.ids()), len(mail.ids())),
        }
        if undecided or reserved + waiting != sum(self.demand.values()):
            return False
        backordered = {b["order_id"] for b in ok(http.get(f"{stack.url('inventory.2')}/v1/backorders"))}
        wanted = self.expected_deliveries(backordered)
        queued = Counter((d["customer_id"], d["channel"]) for d in rows)
        return (
            queued == wanted
            and sent == len(rows)
            and len(hooks.ids()) == sum(v for (_, ch), v in wanted.items() if ch == "webhook")
            and len(mail.ids()) == sum(v for (_, ch), v in wanted.items() if ch == "email")
        )

    def delivery_rows(self, stack: Stack, http: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for customer in CUSTOMERS:
            rows += ok(
                http.get(
                    f"{stack.url('notifications.2')}/v1/deliveries", params={"customer_id": customer, "limit": 1000}
                )
            )
        return rows

    def reconcile(
        self,
        stack: Stack,
        http: Any,
        key: str,
        mail: MailReceiver,
        hooks: WebhookReceiver,
        secrets: dict[str, str],
    ) -> dict[str, Any]:
        # Stock: never more reserved than on hand; every unit demanded is reserved or waiting, once.
        levels = ok(http.get(f"{stack.url('inventory.2')}/v1/stock"))
        reserved = Counter[str]()
        for row in levels:
            assert 0 <= row["reserved"] <= row["on_hand"], row
            assert row["on_hand"] == STOCK[(row["warehouse_id"], row["sku"])], row  # nothing shipped
            reserved[row["sku"]] += row["reserved"]
        queue = ok(http.get(f"{stack.url('inventory.2')}/v1/backorders"))
        waiting = Counter[str]()
        for line in queue:
            waiting[line["sku"]] += line["qty"]
        assert reserved + waiting == self.demand, (reserved, waiting, self.demand)
        on_hand = Counter[str]()
        for (_, sku), units in STOCK.items():
            on_hand[sku] += units
        for sku, units in on_hand.items():
            # Demand is higher than stock: all of it is taken, and not one unit more.
            assert self.demand[sku] > units
            assert reserved[sku] == units, (sku, reserved[sku], units)

        # Per order and line: allocated + backordered = ordered, from the events in its timeline
        # (an allocation applied twice, or emitted twice, would break the sum).
        allocated_units = Counter[str]()
        timelines = self.timelines(stack, http, key)
        for order_id, timeline in timelines.items():
            kinds = Counter(entry["type"] for entry in timeline)
            assert kinds["order.received"] == 1, (order_id, timeline)
            covered: defaultdict[int, int] = defaultdict(int)
            for entry in timeline:
                if entry["type"] == "order.allocated":
                    for allocation in entry["details"]["allocations"]:
                        covered[allocation["line_no"]] += allocation["qty"]
                        allocated_units[allocation["sku"]] += allocation["qty"]
                elif entry["type"] == "order.backordered":
                    for line in entry["details"]["lines"]:
                        covered[line["line_no"]] += line["qty"]
            ordered = {line["line_no"]: line["qty"] for line in self.orders[order_id].body["lines"]}
            assert dict(covered) == ordered, (order_id, timeline)
        assert allocated_units == reserved, (allocated_units, reserved)

        # Notifications: one delivery per (event, customer, channel), all sent, every one received.
        backordered = {line["order_id"] for line in queue}
        rows = self.delivery_rows(stack, http)
        assert Counter((d["customer_id"], d["channel"]) for d in rows) == self.expected_deliveries(backordered)
        assert len({(d["ce_id"], d["customer_id"], d["channel"]) for d in rows}) == len(rows)
        assert all(d["status"] == "delivered" for d in rows)
        assert set(hooks.ids()) == {d["id"] for d in rows if d["channel"] == "webhook"}
        assert set(mail.ids()) == {d["id"] for d in rows if d["channel"] == "email"}
        for hook in hooks.snapshot():
            hook.verified(secrets[hook.customer_id])
        return {
            "units demanded": dict(sorted(self.demand.items())),
            "units reserved (= on hand)": dict(sorted(reserved.items())),
            "units waiting in the backorder queue": dict(sorted(waiting.items())),
            "orders backordered in part or whole": len(backordered),
            "delivery rows": len(rows),
            "webhooks received again after the kill (same webhook-id)": sum(c - 1 for c in hooks.ids().values()),
            "emails received again after the kill (same Message-ID)": sum(c - 1 for c in mail.ids().values()),
        }
