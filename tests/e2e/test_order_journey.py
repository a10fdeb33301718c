"""Three customers' orders through the whole stack, started the way `make run` starts it
(embedded Tansu, five uvicorn processes, SQLite files, or one PostgreSQL database per
service), with a real webhook receiver and a real SMTP server on loopback.

The scenario (every event time the KPIs use is one this test chose):

- Stock: KETTLE only in WH-A (10), TEA only in WH-B (10), no CUP anywhere but 10 CUP
  inbound to WH-A, due in ten days.
- E2E-SPLIT (C-SPLIT, standard): 2 KETTLE + 3 TEA. No warehouse has both, so it is split
  over WH-A and WH-B at the first pass: two shipments. WH-A ships with acme (3 days
  standard transit), WH-B with swift, configured with no transit time, after 15 seconds
  of handling: the WH-B parcel is still on its way when its promise passes, shipping's
  delay scan tells the customer (order.delayed, once), and it is delivered late, at T.
- E2E-STD (C-STD, standard) 4 CUP, placed first, and E2E-CORE (C-CORE, core customer,
  zh-CN) 3 CUP: both backordered, the notice carrying the inbound's date. A receipt of 3
  CUP releases E2E-CORE first (core customers are served first); a second of 4 CUP then
  releases E2E-STD. E2E-CORE arrives with one of its 3 units damaged.

T, the anchor, is 25 seconds after the test starts: every parcel has left by then, the
carrier posts the deliveries once T has passed, dated T - 15 s, T - 10 s, T - 5 s and T, and
each order was placed a chosen time before its last delivery, so cycle times are exact.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.flows import (
    bearer,
    kpi_values,
    ok,
    order_body,
    post_carrier_event,
    shipments,
    subscribe_webhook,
    wait_for,
)
from tests.support.receivers import MailReceiver, WebhookReceiver
from tests.support.stack import CallLog, Stack, api_key

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ACME_SECRET = "acme-e2e-webhook-secret-0001"
SWIFT_SECRET = "swift-e2e-webhook-secret-0002"
CARRIER_SECRETS = {"acme": ACME_SECRET, "swift": SWIFT_SECRET}
WH_B_HANDLING = timedelta(seconds=15)
"""WH-B's ship-by is 15 s after allocation and swift has no transit time, so its promise is
allocation + 15 s; the parcel is dated delivered at T, which is later."""
ANCHOR_AFTER_START = timedelta(seconds=25)

# Each order's cycle time (last delivery - placed_at), chosen.
SPLIT_CYCLE = timedelta(days=2, hours=4)  # 187,200 s
STD_CYCLE = timedelta(days=3)  # 259,200 s
CORE_CYCLE = timedelta(days=1, hours=12)  # 129,600 s

CUSTOMERS = {"C-SPLIT": "split@example.com", "C-STD": "std@example.com", "C-CORE": "core@example.cn"}
EXPECTED_NOTICES = {
    # order.allocated is internal progress: customers hear when it ships.
    "C-SPLIT": Counter({"order.received": 1, "order.shipped": 2, "order.delayed": 1, "order.delivered": 2}),
    "C-STD": Counter({"order.received": 1, "order.backordered": 1, "order.shipped": 1, "order.delivered": 1}),
    "C-CORE": Counter({"order.received": 1, "order.backordered": 1, "order.shipped": 1, "order.delivered": 1}),
}


def stack_environment(mail: MailReceiver) -> dict[str, dict[str, str]]:
    carriers = (
        f'{{"acme": {{"secret": "{ACME_SECRET}"}}, '
        f'"swift": {{"secret": "{SWIFT_SECRET}", "transit_days": {{"standard": 0}}}}}}'
    )
    return {
        "notifications": {"SMTP_URL": mail.smtp_url},
        "shipping": {
            "CARRIERS": carriers,
            "DEFAULT_CARRIER": "acme",
            "WAREHOUSE_CARRIERS": '{"WH-B": "swift"}',
            "WAREHOUSE_HANDLING_HOURS": f'{{"WH-B": {WH_B_HANDLING / timedelta(hours=1)}}}',
            # Scan for late shipments every second (default 5 s): the delay notice comes sooner.
            "DELAY_SCAN_SECONDS": "1",
        },
    }


def test_orders_split_backordered_released_shipped_and_delivered_are_told_once_and_measured_exactly(
    tmp_path: Path, stack_databases: dict[str, str]
) -> None:
    with MailReceiver() as mail, WebhookReceiver() as hooks:
        stack = Stack(tmp_path / "data", database_urls=stack_databases, service_env=stack_environment(mail))
        try:
            stack.start()
            Journey(stack, mail, hooks).run()
        except BaseException:
            print(stack.logs_tail())
            raise
        finally:
            stack.stop()


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Journey:
    def __init__(self, stack: Stack, mail: MailReceiver, hooks: WebhookReceiver) -> None:
        self.stack = stack
        self.mail = mail
        self.hooks = hooks
        self.intake, self.inventory, self.shipping, self.notifications, self.kpi = (
            stack.url(name) for name in ("order-intake", "inventory", "shipping", "notifications", "kpi")
        )
        self.calls = CallLog()
        self.http = self.calls.client(timeout=30)
        self.start = datetime.now(UTC).replace(microsecond=0)
        self.anchor = self.start + ANCHOR_AFTER_START
        self.eta = self.start.date() + timedelta(days=10)
        self.key = api_key(stack, "erp-e2e")
        self.secrets: dict[str, str] = {}

    def run(self) -> None:
        with self.http:
            self.subscribe_customers()
            self.stock_the_warehouses()
            anchor = self.anchor
            standard = self.place("E2E-STD", "C-STD", [("CUP", 4)], placed_at=anchor - timedelta(seconds=5) - STD_CYCLE)
            core = self.place(
                "E2E-CORE",
                "C-CORE",
                [("CUP", 3)],
                placed_at=anchor - timedelta(seconds=10) - CORE_CYCLE,
                tier="core",
                locale="zh-CN",
            )
            split = self.place("E2E-SPLIT", "C-SPLIT", [("KETTLE", 2), ("TEA", 3)], placed_at=anchor - SPLIT_CYCLE)

            split_a, split_b = self.ship_the_split_order(split)
            core_shipment, standard_shipment = self.release_the_backorders(core=core, standard=standard)
            self.delay_is_announced(split)
            # The carrier reports once T has passed (shipping refuses events dated ahead of it).
            time.sleep(max(0.0, (self.anchor - datetime.now(UTC)).total_seconds() + 1))
            self.deliver(split_a, self.anchor - timedelta(seconds=15))
            self.deliver(
                core_shipment,
                self.anchor - timedelta(seconds=10),
                lines=[{"line_no": 1, "sku": "CUP", "qty_delivered": 3, "qty_damaged": 1}],
            )
            self.deliver(standard_shipment, self.anchor - timedelta(seconds=5))
            self.deliver(split_b, self.anchor)  # late: its promise was allocation + 15 s

            deliveries = self.every_notice_was_delivered_once()
            self.backorder_notices_carry_the_restock_date(deliveries)
            self.timelines_show_every_step(split=split, core=core, standard=standard)
            self.kpis_are_exact(split=split, core=core, standard=standard)
            self.stock_is_consistent()
            assert self.calls.server_errors() == []

    # -- set-up ---------------------------------------------------------------------------

    def subscribe_customers(self) -> None:
        for customer in CUSTOMERS:
            url = self.hooks.url_for(customer)
            self.secrets[customer] = subscribe_webhook(self.http, self.notifications, customer, url)

    def stock_the_warehouses(self) -> None:
        for warehouse, priority in (("WH-A", 1), ("WH-B", 2)):
            ok(
                self.http.put(
                    f"{self.inventory}/v1/warehouses/{warehouse}",
                    json={"name": warehouse, "country": "CN", "handling_hours": 24, "priority": priority},
                )
            )
        for warehouse, sku, on_hand in (("WH-A", "KETTLE", 10), ("WH-B", "TEA", 10), ("WH-A", "CUP", 0)):
            ok(self.http.put(f"{self.inventory}/v1/stock/{warehouse}/{sku}", json={"on_hand": on_hand}))
        ok(self.http.put(f"{self.inventory}/v1/inbound/WH-A/CUP", json={"qty": 10, "eta": self.eta.isoformat()}))

    def place(self, external_ref: str, customer: str, lines: list[tuple[str, int]], **options: Any) -> str:
        body = order_body(external_ref, customer, lines, email=CUSTOMERS[customer], **options)
        accepted = ok(self.http.post(f"{self.intake}/v1/orders", json=body, headers=bearer(self.key)), 201)
        return str(accepted["order_id"])

    # -- warehouse and carrier --------------------------------------------------------------

    def shipments_of(self, order_id: str, count: int) -> list[dict[str, Any]]:
        found = wait_for(
            lambda: (s := shipments(self.http, self.shipping, order_id=order_id)) and len(s) >= count and s,
            timeout=60,
            what=f"{count} shipment(s) of {order_id}",
        )
        assert len(found) == count, found
        return sorted(found, key=lambda s: s["warehouse_id"])

    def dispatch(self, shipment: dict[str, Any], carrier: str) -> dict[str, Any]:
        # A second after allocation: well within every ship-by (WH-B's is two minutes).
        dispatched_at = at(shipment["allocated_at"]) + timedelta(seconds=1)
        shipped = ok(
            self.http.post(
                f"{self.shipping}/v1/shipments/{shipment['id']}/dispatch",
                json={
                    "carrier": carrier,
                    "tracking_number": f"TRK-{shipment['id']}",
                    "dispatched_at": dispatched_at.isoformat(),
                },
            )
        )
        assert shipped["status"] == "shipped", shipped
        assert shipped["late_dispatch"] is False, shipped
        return dict(shipped)

    def deliver(
        self, shipment: dict[str, Any], delivered_at: datetime, lines: list[dict[str, Any]] | None = None
    ) -> None:
        assert delivered_at >= at(shipment["shipped_at"]), f"the test ran too slowly for its anchor: {shipment}"
        carrier = shipment["carrier"]
        event: dict[str, Any] = {
            "event_id": f"EV-{shipment['id']}-delivered",
            "tracking_number": shipment["tracking_number"],
            "status": "delivered",
            "occurred_at": delivered_at.isoformat(),
            "signed_by": "front desk",
        }
        if lines is not None:
            event["lines"] = lines
        ack = post_carrier_event(self.http, self.shipping, carrier, CARRIER_SECRETS[carrier], event)
        assert ack == {"event_id": event["event_id"], "shipment_id": shipment["id"], "outcome": "applied"}, ack

    def ship_the_split_order(self, split: str) -> tuple[dict[str, Any], dict[str, Any]]:
        at_a, at_b = self.shipments_of(split, 2)
        assert (at_a["warehouse_id"], at_b["warehouse_id"]) == ("WH-A", "WH-B")
        assert [line["sku"] for line in at_a["lines"]] == ["KETTLE"]
        assert [line["sku"] for line in at_b["lines"]] == ["TEA"]
        # WH-B's promise (allocation + 15 s handling + no transit) is before T, WH-A's (3 days) after.
        assert at(at_b["original_promised_delivery_at"]) < self.anchor < at(at_a["original_promised_delivery_at"])
        return self.dispatch(at_a, "acme"), self.dispatch(at_b, "swift")

    def delay_is_announced(self, split: str) -> None:
        """The WH-B parcel passed its promise undelivered: order.delayed (transit) reaches the order."""

        def delayed() -> dict[str, Any] | None:
            order = ok(self.http.get(f"{self.intake}/v1/orders/{split}", headers=bearer(self.key)))
            return order if order["delayed"] else None

        order = wait_for(delayed, timeout=30, what="the late WH-B parcel announced")
        assert order["latest_delay"]["stage"] == "transit", order

    def release_the_backorders(self, *, core: str, standard: str) -> tuple[dict[str, Any], dict[str, Any]]:
        def queue() -> list[dict[str, Any]]:
            return list(ok(self.http.get(f"{self.inventory}/v1/backorders")))

        waiting = wait_for(lambda: len(q := queue()) == 2 and q, timeout=60, what="both CUP orders backordered")
        # Core customers first, although the standard customer ordered earlier.
        assert [(line["order_id"], line["qty"]) for line in waiting] == [(core, 3), (standard, 4)]
        assert {line["expected_restock_date"] for line in waiting} == {self.eta.isoformat()}

        first = self.receipt("R-CUP-1", 3)
        assert first["orders_served"] == [core]
        (core_shipment,) = self.shipments_of(core, 1)
        core_shipped = self.dispatch(core_shipment, "acme")

        second = self.receipt("R-CUP-2", 4)
        assert second["orders_served"] == [standard]
        (standard_shipment,) = self.shipments_of(standard, 1)
        return core_shipped, self.dispatch(standard_shipment, "acme")

    def receipt(self, receipt_id: str, qty: int) -> dict[str, Any]:
        body = {"receipt_id": receipt_id, "warehouse_id": "WH-A", "lines": [{"sku": "CUP", "qty": qty}]}
        return dict(ok(self.http.post(f"{self.inventory}/v1/receipts", json=body), 201))

    # -- what customers were told ----------------------------------------------------------

    def deliveries(self, customer: str) -> list[dict[str, Any]]:
        return list(ok(self.http.get(f"{self.notifications}/v1/deliveries", params={"customer_id": customer})))

    def every_notice_was_delivered_once(self) -> dict[str, list[dict[str, Any]]]:
        expected_total = sum(sum(notices.values()) for notices in EXPECTED_NOTICES.values())

        def all_sent() -> bool:
            rows = [d for customer in CUSTOMERS for d in self.deliveries(customer)]
            return (
                len(rows) == 2 * expected_total
                and all(d["status"] == "delivered" for d in rows)
                and len(self.hooks.ids()) == expected_total
                and len(self.mail.ids()) == expected_total
            )

        def progress() -> dict[str, object]:
            rows = [d for customer in CUSTOMERS for d in self.deliveries(customer)]
            return {
                "deliveries": Counter((d["customer_id"], d["channel"], d["notice"], d["status"]) for d in rows),
                "webhooks received": len(self.hooks.ids()),
                "emails received": len(self.mail.ids()),
            }

        wait_for(all_sent, timeout=60, what="every notice delivered by webhook and email", state=progress)
        time.sleep(1.5)  # a duplicate sent late would arrive now

        deliveries = {customer: self.deliveries(customer) for customer in CUSTOMERS}
        webhooks = self.hooks.snapshot()
        emails = self.mail.snapshot()
        for customer, notices in EXPECTED_NOTICES.items():
            rows = deliveries[customer]
            for channel in ("webhook", "email"):
                mine = [d for d in rows if d["channel"] == channel]
                assert Counter(d["notice"] for d in mine) == notices, (customer, channel, mine)
                # One delivery per (event, customer, channel).
                assert len({d["ce_id"] for d in mine}) == len(mine)
            by_ce = {d["ce_id"]: d for d in rows if d["channel"] == "webhook"}
            received = [hook for hook in webhooks if hook.customer_id == customer]
            # Exactly once each, by webhook-id, and signed with the customer's secret.
            assert Counter(hook.webhook_id for hook in received) == Counter(d["id"] for d in by_ce.values())
            for hook in received:
                payload = hook.verified(self.secrets[customer])
                delivery = by_ce[payload["data"]["event_id"]]
                assert hook.webhook_id == delivery["id"]
                assert payload["type"] == delivery["notice"]
                assert payload["data"]["customer_id"] == customer
            # Exactly once each by email (Message-ID names the delivery), to the order's address.
            email_rows = {d["id"]: d for d in rows if d["channel"] == "email"}
            mails = [mail for mail in emails if mail.delivery_id in email_rows]
            assert Counter(mail.delivery_id for mail in mails) == Counter(email_rows.keys())
            for mail in mails:
                assert mail.to == (CUSTOMERS[customer],)
                assert mail.subject == email_rows[mail.delivery_id]["subject"]
        assert len(webhooks) == len(emails) == expected_total  # nobody else heard anything
        return deliveries

    def backorder_notices_carry_the_restock_date(self, deliveries: dict[str, list[dict[str, Any]]]) -> None:
        eta: date = self.eta
        written = {"C-STD": f"{eta.day} {eta:%B %Y}", "C-CORE": f"{eta.year}年{eta.month}月{eta.day}日"}
        for customer, words in written.items():
            (email_row,) = [
                d for d in deliveries[customer] if d["notice"] == "order.backordered" and d["channel"] == "email"
            ]
            (mail,) = [m for m in self.mail.snapshot() if m.delivery_id == email_row["id"]]
            assert words in mail.text, mail.text
            (hook_row,) = [
                d for d in deliveries[customer] if d["notice"] == "order.backordered" and d["channel"] == "webhook"
            ]
            (hook,) = [h for h in self.hooks.snapshot() if h.webhook_id == hook_row["id"]]
            event = hook.verified(self.secrets[customer])["data"]["event"]
            assert event["expected_restock_date"] == eta.isoformat()
            assert words in hook.verified(self.secrets[customer])["data"]["notice"]["text"]

    # -- what the order and the KPIs say ----------------------------------------------------

    def timelines_show_every_step(self, *, split: str, core: str, standard: str) -> None:
        backordered_steps = Counter(
            {
                "order.received": 1,
                "order.backordered": 1,
                "order.allocated": 1,
                "order.shipped": 1,
                "order.delivered": 1,
            }
        )
        expected = {
            split: Counter(
                {
                    "order.received": 1,
                    "order.allocated": 1,
                    "order.shipped": 2,
                    "order.delayed": 1,
                    "order.delivered": 2,
                }
            ),
            core: backordered_steps,
            standard: backordered_steps,
        }
        for order_id, steps in expected.items():

            def detail(order_id: str = order_id, steps: Counter[str] = steps) -> dict[str, Any] | None:
                order = ok(self.http.get(f"{self.intake}/v1/orders/{order_id}", headers=bearer(self.key)))
                seen = Counter(entry["type"] for entry in order["timeline"])
                return order if seen == steps and order["status"] == "delivered" else None

            order = wait_for(detail, timeout=30, what=f"timeline of {order_id}")
            times = [at(entry["occurred_at"]) for entry in order["timeline"]]
            assert times == sorted(times), order["timeline"]
            assert order["delayed"] is False
            summaries = {entry["type"]: entry["summary"] for entry in order["timeline"]}
            if order_id != split:
                assert f"restock expected {self.eta.isoformat()}" in summaries["order.backordered"]
        split_order = ok(self.http.get(f"{self.intake}/v1/orders/{split}", headers=bearer(self.key)))
        allocated = next(e for e in split_order["timeline"] if e["type"] == "order.allocated")
        assert "from WH-A" in allocated["summary"]
        assert "from WH-B" in allocated["summary"]
        core_order = ok(self.http.get(f"{self.intake}/v1/orders/{core}", headers=bearer(self.key)))
        delivered = next(e for e in core_order["timeline"] if e["type"] == "order.delivered")
        assert "1 damaged" in delivered["summary"]

    def kpis_are_exact(self, *, split: str, core: str, standard: str) -> None:
        def summary() -> dict[str, Any] | None:
            report = ok(self.http.get(f"{self.kpi}/v1/kpis", params={"window": "all"}))
            return report if report["overall"]["orders_delivered"] == 3 else None

        overall = wait_for(summary, timeout=30, what="kpi sees three orders delivered")["overall"]
        assert (overall["orders_received"], overall["orders_delivered"], overall["orders_open"]) == (3, 3, 0)
        assert overall["orders_cancelled"] == 0
        # By hand, from the scenario:
        # lines: SPLIT 2 (KETTLE 2, TEA 3), STD 1 (CUP 4), CORE 1 (CUP 3): 4 lines, 12 units, 3 orders.
        # First pass: SPLIT fully allocated (2 lines, 5 units); STD and CORE nothing (backordered).
        #   line fill 2/4, unit fill 5/12, order fill 1/3.
        # Secondary (counting the receipts' releases, flagged complete): 4/4, 12/12, 3/3.
        # Backorder rate: STD and CORE of 3 orders: 2/3.
        # Shipments: SPLIT-A, SPLIT-B, CORE, STD, each dispatched a second after allocation,
        #   inside its ship-by (WH-B: 15 s, WH-A: 24 h): on-time dispatch 4/4.
        # On-time delivery: SPLIT-B delivered at T after its promise (allocation + 15 s + 0 days);
        #   the three acme parcels well before theirs (allocation + 24 h + 3 days): 3/4.
        # Damage: 1 damaged unit (CORE) of 2 + 3 + 3 + 4 = 12 delivered: 1/12.
        # Accuracy: every delivered line has the ordered SKU and the shipped qty: 4/4.
        # Per delivered order: in full 3/3; on time SPLIT no, CORE and STD yes: OTIF 2/3;
        #   damage-free SPLIT and STD: 2/3; perfect (all four criteria) STD only: 1/3.
        assert kpi_values(overall) == {
            "line_fill_rate_first_pass": (2, 4),
            "unit_fill_rate_first_pass": (5, 12),
            "order_fill_rate_first_pass": (1, 3),
            "line_fill_rate_secondary": (4, 4),
            "unit_fill_rate_secondary": (12, 12),
            "order_fill_rate_secondary": (3, 3),
            "backorder_rate": (2, 3),
            "on_time_dispatch_rate": (4, 4),
            "on_time_delivery_rate": (3, 4),
            "in_full_rate": (3, 3),
            "otif_rate": (2, 3),
            "damage_rate": (1, 12),
            "damage_free_order_rate": (2, 3),
            "order_accuracy": (4, 4),
            "perfect_order_rate": (1, 3),
        }
        rates = {k["kpi"]: k["value"] for k in overall["kpis"]}
        assert rates["perfect_order_rate"] == pytest.approx(1 / 3)
        assert rates["damage_rate"] == pytest.approx(1 / 12)
        failures = {criterion: n for criterion, n in overall["perfect_order_failures"].items() if n}
        assert failures == {"on_time": 1, "damage_free": 1}
        # CUP: both lines ordering it were backordered.
        stockouts = {s["sku"]: (s["backordered_lines"], s["ordered_lines"]) for s in overall["top_stockout_skus"]}
        assert stockouts.get("CUP") == (2, 2)

        # By tier: CORE alone is core (damaged, not perfect); SPLIT (late) and STD (perfect) standard.
        by_tier = ok(self.http.get(f"{self.kpi}/v1/kpis", params={"window": "all", "by": "tier"}))
        tiers = {group["group"]: kpi_values(group) for group in by_tier["groups"]}
        assert tiers["core"]["perfect_order_rate"] == (0, 1)
        assert tiers["core"]["damage_rate"] == (1, 3)
        assert tiers["standard"]["perfect_order_rate"] == (1, 2)
        assert tiers["standard"]["on_time_delivery_rate"] == (2, 3)

        # Cycle time, last delivery - placed_at, as chosen: SPLIT 187,200 s, STD 259,200 s, CORE 129,600 s.
        #   mean = (187,200 + 259,200 + 129,600) / 3 = 192,000 s;
        #   population std = sqrt(((-4,800)^2 + 67,200^2 + (-62,400)^2) / 3) = sqrt(2,810,880,000) ≈ 53,017.7 s;
        #   the median is SPLIT's 187,200 s. Backordered (STD, CORE): mean 194,400 s; not backordered: 187,200 s.
        cycles = [SPLIT_CYCLE.total_seconds(), STD_CYCLE.total_seconds(), CORE_CYCLE.total_seconds()]
        mean = sum(cycles) / 3
        assert mean == 192_000
        std = math.sqrt(sum((c - mean) ** 2 for c in cycles) / 3)
        report = ok(self.http.get(f"{self.kpi}/v1/kpis/cycle-time", params={"window": "all"}))
        series = {s["series"]: s for s in report["overall"]}
        cycle = series["cycle_time"]
        assert cycle["count"] == 3
        assert cycle["mean_seconds"] == pytest.approx(mean, abs=1e-6)
        assert cycle["std_seconds"] == pytest.approx(std, abs=1e-3)
        # Percentiles come from a DDSketch with 1 % relative accuracy.
        assert cycle["percentiles_seconds"]["p50"] == pytest.approx(187_200, rel=report["relative_accuracy"])
        assert series["cycle_time_backordered"]["count"] == 2
        assert series["cycle_time_backordered"]["mean_seconds"] == pytest.approx(194_400, abs=1e-6)
        assert series["cycle_time_not_backordered"]["count"] == 1
        assert series["cycle_time_not_backordered"]["mean_seconds"] == pytest.approx(187_200, abs=1e-6)
        # Histogram (upper bounds inclusive): 129,600 s falls under 2 d; 187,200 and 259,200 under 3 d.
        assert {b["le"]: b["count"] for b in cycle["buckets"] if b["count"]} == {172_800.0: 1, 259_200.0: 2}

        for order_id, cycle_seconds, perfect in (
            (split, 187_200.0, False),
            (standard, 259_200.0, True),
            (core, 129_600.0, False),
        ):
            scored = ok(self.http.get(f"{self.kpi}/v1/orders/{order_id}/kpi"))
            assert scored["stage"] == "delivered"
            assert scored["durations_seconds"]["cycle_time"] == [cycle_seconds]
            assert scored["perfect"] is perfect
        split_kpi = ok(self.http.get(f"{self.kpi}/v1/orders/{split}/kpi"))
        assert split_kpi["criteria"]["on_time"]["passed"] is False
        assert split_kpi["groups"]["warehouse"] == ["WH-A", "WH-B"]
        assert split_kpi["groups"]["carrier"] == ["acme", "swift"]
        core_kpi = ok(self.http.get(f"{self.kpi}/v1/orders/{core}/kpi"))
        assert core_kpi["criteria"]["damage_free"] == {"passed": False, "reason": "1 of 3 units damaged"}
        assert core_kpi["backordered"] is True

    def stock_is_consistent(self) -> None:
        # What left: 2 KETTLE from WH-A, 3 TEA from WH-B, 3 + 4 CUP received and shipped from WH-A.
        expected = {("WH-A", "KETTLE"): (8, 0), ("WH-B", "TEA"): (7, 0), ("WH-A", "CUP"): (0, 0)}

        def levels() -> dict[tuple[str, str], tuple[int, int]]:
            rows = ok(self.http.get(f"{self.inventory}/v1/stock"))
            return {(r["warehouse_id"], r["sku"]): (r["on_hand"], r["reserved"]) for r in rows}

        wait_for(lambda: levels() == expected, timeout=30, what=f"stock levels {expected}")


def test_the_harness_stops_everything_it_started(tmp_path: Path) -> None:
    """No orphans: every process the stack started is gone once it is stopped."""
    stack = Stack(tmp_path / "data")
    try:
        stack.start(["order-intake"])
        pids = stack.pids()
        assert len(pids) == 2
        assert httpx.get(f"{stack.url('order-intake')}/readyz", timeout=5).status_code == 200
    finally:
        stack.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
