"""The whole stack under faults while orders flow: every service SIGKILLed in turn and
restarted, the broker hung for a while, a database write-locked for a while. Afterwards
everything reconciles: each accepted order reached every service exactly once in effect,
no call got a 5xx other than 503 with Retry-After, and the stack caught up in bounded time.

Runs on the embedded default (`make run`): Tansu and SQLite. The counts are printed for the
issue note (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fulfil.testing import read_topic

from tests.support.flows import bearer, kpi_values, ok, order_body, orders, shipments, subscribe_webhook, wait_for
from tests.support.receivers import MailReceiver, WebhookReceiver
from tests.support.stack import SERVICE_NAMES, CallLog, Stack, api_key, notifications_that_may_be_killed
from tests.support.traffic import Accepted, OrderStream

pytestmark = pytest.mark.slow

CUSTOMERS = [f"C-{n}" for n in range(6)]
WEBHOOK_CUSTOMERS = CUSTOMERS[:3]
"""Half the customers also have a webhook; everyone has email."""
IN_STOCK = ("SKU-A", "SKU-B", "SKU-C")
OUT_OF_STOCK = "SKU-OUT"
MAX_ORDERS = 250
ORDERS_PER_SECOND = 2.5
CATCH_UP_SECONDS = 120
BROKER_HUNG_SECONDS = 8
DATABASE_LOCKED_SECONDS = 6


def order_for(index: int) -> dict[str, Any]:
    """Every fourth order also wants a SKU nobody has: allocated in part, backordered in part."""
    customer = CUSTOMERS[index % len(CUSTOMERS)]
    partly_out = index % 4 == 3
    lines = [("SKU-A", 1), (OUT_OF_STOCK, 1)] if partly_out else [(IN_STOCK[index % 3], 1 + index % 3)]
    return order_body(f"FAULT-{index:04d}", customer, lines, email=f"{customer.lower()}@example.com")


def backordered(order: Accepted) -> bool:
    return any(line["sku"] == OUT_OF_STOCK for line in order.body["lines"])


@dataclass
class Fault:
    what: str
    seconds: float


def test_every_accepted_order_reconciles_after_kills_a_hung_broker_and_locked_databases(tmp_path: Path) -> None:
    with MailReceiver() as mail, WebhookReceiver() as hooks:
        stack = Stack(
            tmp_path / "data",
            service_env={"notifications": notifications_that_may_be_killed(mail.smtp_url)},
        )
        try:
            stack.start()
            run_faults_and_reconcile(stack, mail, hooks)
        except BaseException:
            print(stack.logs_tail())
            raise
        finally:
            stack.stop()


def run_faults_and_reconcile(stack: Stack, mail: MailReceiver, hooks: WebhookReceiver) -> None:
    intake, inventory, notifications = (stack.url(s) for s in ("order-intake", "inventory", "notifications"))
    key = api_key(stack, "erp-faults")
    calls = CallLog()
    secrets: dict[str, str] = {}
    with calls.client(timeout=45) as http:
        ok(
            http.put(
                f"{inventory}/v1/warehouses/WH-1",
                json={"name": "WH-1", "country": "CN", "handling_hours": 24, "priority": 1},
            )
        )
        for sku in IN_STOCK:
            ok(http.put(f"{inventory}/v1/stock/WH-1/{sku}", json={"on_hand": 1_000_000}))
        for customer in WEBHOOK_CUSTOMERS:
            secrets[customer] = subscribe_webhook(http, notifications, customer, hooks.url_for(customer))

    stream = OrderStream(intake, key, order_for, calls, rate=ORDERS_PER_SECOND, limit=MAX_ORDERS)
    stream.start()
    faults: list[Fault] = []
    try:
        stream.wait_for(10)
        # (a) Each service in turn: SIGKILL (nothing flushed, nothing committed), then start it again.
        for service in SERVICE_NAMES:
            began = time.monotonic()
            stack.kill(service)
            time.sleep(1.0)
            stack.restart(service)
            faults.append(Fault(f"{service} killed and restarted", time.monotonic() - began))
            time.sleep(1.0)
        # (b) The broker hangs (SIGSTOP) and comes back (SIGCONT). Not a restart: the embedded
        # Tansu keeps its log in memory, so a restarted one would have lost every record.
        began = time.monotonic()
        stack.pause_broker()
        with calls.client(timeout=10) as http:
            # The fault is real: readiness says so (503 with Retry-After) once the broker stops answering.
            wait_for(lambda: http.get(f"{intake}/readyz").status_code == 503, timeout=BROKER_HUNG_SECONDS, interval=0.5)
        time.sleep(max(0.0, BROKER_HUNG_SECONDS - (time.monotonic() - began)))
        stack.resume_broker()
        faults.append(Fault("broker hung (SIGSTOP/SIGCONT)", time.monotonic() - began))
        time.sleep(2.0)
        # (c) Databases that stop taking writes: the write lock held from outside, on the
        # database the order API commits to, then on the one inventory's consumer writes to.
        for service in ("order-intake", "inventory"):
            began = time.monotonic()
            before = len(stream.accepted)
            with stack.sqlite_locked(service):
                time.sleep(DATABASE_LOCKED_SECONDS)
                if service == "inventory":
                    # The fault is real: orders accepted meanwhile cannot have been allocated.
                    assert len(stream.accepted) > before, "no order flowed while inventory's database was locked"
                    with calls.client(timeout=10) as http:
                        latest = stream.accepted[-1].order_id
                        order = ok(http.get(f"{intake}/v1/orders/{latest}", headers=bearer(key)))
                    assert order["status"] == "received", order
            faults.append(Fault(f"{service} database write-locked", time.monotonic() - began))
            if service == "order-intake":
                # The fault is real: the order posted meanwhile waited for the lock to go.
                stream.wait_for(before + 1)
                assert max(order.seconds for order in stream.accepted[before:]) > DATABASE_LOCKED_SECONDS / 2
            time.sleep(1.0)
    finally:
        accepted = stream.stop()
    traffic_ended = time.monotonic()

    with calls.client(timeout=45) as http:
        expected = Expectation(accepted)
        wait_for(
            lambda: expected.caught_up(stack, http, key, mail, hooks),
            timeout=CATCH_UP_SECONDS,
            interval=1.0,
            what="the stack caught up with every accepted order",
            state=lambda: expected.progress,
        )
        caught_up_after = time.monotonic() - traffic_ended
        time.sleep(2)  # anything applied twice would show now
        counts = expected.reconcile(stack, http, key, mail, hooks, secrets)
    dead_letters = asyncio.run(read_topic(stack.bootstrap, "order-events.dlq", expect=1, timeout=3))

    report = {
        "orders accepted": len(accepted),
        "of which backordered in part": sum(backordered(o) for o in accepted),
        "POST retries (connection errors, 503, 409 in flight)": stream.retries,
        "connection errors": len(calls.connection_errors),
        "503 with Retry-After (readiness probes while the broker hung included)": sum(
            1 for a in calls.answers if a[2] == 503
        ),
        "slowest order (s, waited out a fault)": round(max(order.seconds for order in accepted), 1),
        "other 5xx": len(calls.server_errors()),
        "caught up after traffic ended (s)": round(caught_up_after, 1),
        "dead-lettered records": len(dead_letters),
        **counts,
    }
    print("\nfault run:")
    for fault in faults:
        print(f"  {fault.what}: {fault.seconds:.1f} s")
    for name, value in report.items():
        print(f"  {name}: {value}")
    assert calls.server_errors() == []
    assert dead_letters == []
    assert len(accepted) >= 60, "too few orders flowed during the faults to prove anything"


class Expectation:
    """What the stack must show for the accepted orders."""

    def __init__(self, accepted: list[Accepted]) -> None:
        self.orders = {order.order_id: order for order in accepted}
        assert len(self.orders) == len(accepted), "an order id was answered for two orders"
        self.backordered = {order_id for order_id, order in self.orders.items() if backordered(order)}
        self.reserved = Counter[str]()
        for order in accepted:
            for line in order.body["lines"]:
                if line["sku"] != OUT_OF_STOCK:
                    self.reserved[line["sku"]] += line["qty"]
        self.deliveries = Counter[tuple[str, str]]()
        """(customer, channel) -> deliveries: order.received, and order.backordered for some."""
        for order_id, order in self.orders.items():
            customer = order.body["customer"]["id"]
            notices = 2 if order_id in self.backordered else 1
            self.deliveries[(customer, "email")] += notices
            if customer in WEBHOOK_CUSTOMERS:
                self.deliveries[(customer, "webhook")] += notices
        self.progress: dict[str, Any] = {}

    def caught_up(self, stack: Stack, http: Any, key: str, mail: MailReceiver, hooks: WebhookReceiver) -> bool:
        """Cheap totals first; the detailed reconciliation runs once these agree."""
        n = len(self.orders)
        overall = ok(http.get(f"{stack.url('kpi')}/v1/kpis", params={"window": "all"}))["overall"]
        reserved = Counter[str]()
        for row in ok(http.get(f"{stack.url('inventory')}/v1/stock")):
            reserved[row["sku"]] += row["reserved"]
        pending = shipments(http, stack.url("shipping"), status="pending")
        delivered = Counter[tuple[str, str]]()
        for customer in CUSTOMERS:
            for d in ok(
                http.get(f"{stack.url('notifications')}/v1/deliveries", params={"customer_id": customer, "limit": 1000})
            ):
                if d["status"] == "delivered":
                    delivered[(customer, d["channel"])] += 1
        self.progress = {
            "kpi orders received": (overall["orders_received"], n),
            "reserved": (dict(reserved), dict(self.reserved)),
            "pending shipments": (len(pending), n),
            "deliveries delivered": (sum(delivered.values()), sum(self.deliveries.values())),
            "webhooks received (distinct)": len(hooks.ids()),
            "emails received (distinct)": len(mail.ids()),
        }
        return (
            overall["orders_received"] >= n
            and reserved == self.reserved
            and len(pending) >= n
            and delivered == self.deliveries
            and len(hooks.ids()) >= sum(v for (_, ch), v in self.deliveries.items() if ch == "webhook")
            and len(mail.ids()) >= sum(v for (_, ch), v in self.deliveries.items() if ch == "email")
        )

    def reconcile(
        self,
        stack: Stack,
        http: Any,
        key: str,
        mail: MailReceiver,
        hooks: WebhookReceiver,
        secrets: dict[str, str],
    ) -> dict[str, Any]:
        n = len(self.orders)
        partial = len(self.backordered)

        # order-intake: every order once, each event once in its timeline, the status it implies.
        listed = list(orders(http, stack.url("order-intake"), key))
        assert sorted(o["order_id"] for o in listed) == sorted(self.orders)
        statuses = Counter(o["status"] for o in listed)
        assert statuses == Counter({"allocated": n - partial, "partially_allocated": partial}), statuses
        timeline_entries = 0
        for order_id in self.orders:
            detail = ok(http.get(f"{stack.url('order-intake')}/v1/orders/{order_id}", headers=bearer(key)))
            steps = Counter(entry["type"] for entry in detail["timeline"])
            wanted = Counter({"order.received": 1, "order.allocated": 1})
            if order_id in self.backordered:
                wanted["order.backordered"] = 1
            assert steps == wanted, (order_id, detail["timeline"])
            timeline_entries += sum(steps.values())

        # inventory: reserved exactly what was allocated (nothing twice), the rest queued once.
        for row in ok(http.get(f"{stack.url('inventory')}/v1/stock")):
            assert 0 <= row["reserved"] <= row["on_hand"], row
        queue = ok(http.get(f"{stack.url('inventory')}/v1/backorders"))
        assert sorted(line["order_id"] for line in queue) == sorted(self.backordered)
        assert {(line["sku"], line["qty"]) for line in queue} <= {(OUT_OF_STOCK, 1)}

        # shipping: one shipment per order (one warehouse each), with what was allocated.
        pending = shipments(http, stack.url("shipping"), status="pending")
        by_order = Counter(s["order_id"] for s in pending)
        assert by_order == Counter(dict.fromkeys(self.orders, 1)), [o for o, c in by_order.items() if c != 1]
        for shipment in pending:
            ordered = self.orders[shipment["order_id"]].body["lines"]
            allocated = [(line["sku"], line["qty"]) for line in ordered if line["sku"] != OUT_OF_STOCK]
            assert [(line["sku"], line["qty"]) for line in shipment["lines"]] == allocated, shipment

        # notifications: one delivery per (event, customer, channel), each delivered, each received.
        rows: list[dict[str, Any]] = []
        for customer in CUSTOMERS:
            rows += ok(
                http.get(f"{stack.url('notifications')}/v1/deliveries", params={"customer_id": customer, "limit": 1000})
            )
        assert Counter((d["customer_id"], d["channel"]) for d in rows) == self.deliveries
        assert all(d["status"] == "delivered" for d in rows)
        assert len({(d["ce_id"], d["customer_id"], d["channel"]) for d in rows}) == len(rows)
        notices = Counter(d["notice"] for d in rows if d["channel"] == "email")
        assert notices == Counter({"order.received": n, "order.backordered": partial}), notices
        webhook_ids = {d["id"] for d in rows if d["channel"] == "webhook"}
        email_ids = {d["id"] for d in rows if d["channel"] == "email"}
        received_hooks, received_mail = hooks.ids(), mail.ids()
        # Every notice arrived; a send cut short by a SIGKILL is sent again with the same
        # webhook-id / Message-ID (at least once on the wire, so receivers can drop repeats).
        assert set(received_hooks) == webhook_ids
        assert set(received_mail) == email_ids
        for hook in hooks.snapshot():
            hook.verified(secrets[hook.customer_id])

        # kpi: every order counted once, in the stage it is in.
        overall = ok(http.get(f"{stack.url('kpi')}/v1/kpis", params={"window": "all"}))["overall"]
        assert (overall["orders_received"], overall["orders_open"], overall["orders_delivered"]) == (n, n, 0)
        stages = {stage: count for stage, count in overall["open_by_stage"].items() if count}
        assert stages == {
            stage: count for stage, count in {"warehouse": n - partial, "backordered": partial}.items() if count
        }
        assert kpi_values(overall)["backorder_rate"] == (partial, n)
        assert kpi_values(overall)["order_fill_rate_first_pass"] == (n - partial, n)

        return {
            "timeline entries": timeline_entries,
            "units reserved": dict(sorted(self.reserved.items())),
            "backorder queue lines": len(queue),
            "shipments": len(pending),
            "delivery rows (webhook / email)": f"{len(webhook_ids)} / {len(email_ids)}",
            "webhooks received again after a kill (same webhook-id)": sum(c - 1 for c in received_hooks.values()),
            "emails received again after a kill (same Message-ID)": sum(c - 1 for c in received_mail.values()),
            "kpi orders received / open": f"{overall['orders_received']} / {overall['orders_open']}",
        }
