"""Unit tests of the shipping rules: no broker, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from fulfil.events import AllocatedLine, DelayStage, DeliveredLine, LineQuantity, ServiceLevel
from shipping import domain, signing
from shipping.config import DEV_CARRIER_SECRET, Settings
from shipping.domain import (
    CarrierStatus,
    OrderTerms,
    PromiseReason,
    ShipmentStatus,
    ShipmentTimes,
    detect_delay,
    make_promise,
)

ALLOCATED = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(("level", "days"), [("standard", 3), ("express", 1), ("economy", 5)])
def test_promise_is_ship_by_plus_the_service_levels_transit_days(level: str, days: int) -> None:
    terms = OrderTerms(service_level=ServiceLevel(level))
    promise = make_promise(ALLOCATED, terms, handling=timedelta(hours=24), transit=days * DAY)
    assert promise.ship_by == ALLOCATED + DAY
    assert promise.promised_delivery_at == ALLOCATED + DAY + days * DAY
    assert promise.reason is PromiseReason.SERVICE_LEVEL


def test_a_feasible_requested_date_is_promised_until_the_end_of_that_day() -> None:
    terms = OrderTerms(requested_delivery_date=date(2026, 3, 10))
    promise = make_promise(ALLOCATED, terms, handling=timedelta(hours=24), transit=3 * DAY)
    assert promise.promised_delivery_at == datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC)
    assert promise.reason is PromiseReason.REQUESTED_DATE


def test_an_infeasible_requested_date_falls_back_to_the_earliest_possible() -> None:
    terms = OrderTerms(requested_delivery_date=date(2026, 3, 3))
    promise = make_promise(ALLOCATED, terms, handling=timedelta(hours=24), transit=3 * DAY)
    assert promise.promised_delivery_at == ALLOCATED + 4 * DAY
    assert promise.reason is PromiseReason.REQUESTED_DATE_NOT_FEASIBLE


def test_unknown_order_terms_use_the_standard_service_level_and_say_so() -> None:
    promise = make_promise(ALLOCATED, domain.UNKNOWN_TERMS, handling=timedelta(hours=8), transit=3 * DAY)
    assert promise.ship_by == ALLOCATED + 8 * HOUR
    assert promise.promised_delivery_at == ALLOCATED + 8 * HOUR + 3 * DAY
    assert promise.reason is PromiseReason.ORDER_TERMS_UNKNOWN


def test_settings_give_per_warehouse_handling_and_per_carrier_transit_days() -> None:
    settings = Settings(
        warehouse_handling_hours={"wh-slow": 48},
        carriers={"fast": {"secret": "x" * 20, "transit_days": {"standard": 2}}},
        warehouse_carriers={"wh-slow": "fast"},
    )
    assert settings.handling_for("wh-slow") == timedelta(hours=48)
    assert settings.handling_for("wh-other") == timedelta(hours=24)
    assert settings.transit_for(settings.carrier_for("wh-slow"), ServiceLevel.STANDARD) == 2 * DAY
    assert settings.transit_for(settings.carrier_for("wh-other"), ServiceLevel.ECONOMY) == 5 * DAY


def test_time_compression_shrinks_every_window_for_demos() -> None:
    settings = Settings(time_compression=288)
    assert settings.handling_for("any") == timedelta(minutes=5)
    assert settings.transit_for("simcarrier", ServiceLevel.STANDARD) == timedelta(minutes=15)
    assert settings.escalate_after == timedelta(minutes=5)


def test_time_compression_also_brings_a_requested_date_closer() -> None:
    placed = ALLOCATED - timedelta(minutes=10)
    terms = OrderTerms(requested_delivery_date=date(2026, 3, 9), placed_at=placed)
    settings = Settings(time_compression=288)
    promise = make_promise(
        ALLOCATED,
        terms,
        handling=settings.handling_for("any"),
        transit=settings.transit_for("simcarrier", ServiceLevel.STANDARD),
        compression=settings.time_compression,
    )
    # Seven and a half days after placement, played in under an hour.
    assert promise.promised_delivery_at == placed + (datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC) - placed) / 288
    assert promise.promised_delivery_at - ALLOCATED < timedelta(hours=1)
    assert promise.reason is PromiseReason.REQUESTED_DATE
    # Uncompressed, a requested date is the end of that day, as before.
    assert domain.requested_deadline(date(2026, 3, 7), placed) == datetime(2026, 3, 7, 23, 59, 59, tzinfo=UTC)
    # A compressed requested date that is too close is still refused as infeasible.
    soon = OrderTerms(requested_delivery_date=date(2026, 3, 2), placed_at=placed)
    tight = make_promise(ALLOCATED, soon, handling=timedelta(hours=1), transit=timedelta(hours=1), compression=288)
    assert tight.reason is PromiseReason.REQUESTED_DATE_NOT_FEASIBLE


def test_production_refuses_the_dev_carrier_secret() -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        Settings(
            environment="production",
            database_url="postgresql+asyncpg://db/shipping",
            kafka_bootstrap_servers="kafka:9092",
            carriers={"acme": {"secret": DEV_CARRIER_SECRET}},
        )


def test_a_split_allocation_plans_one_shipment_per_warehouse() -> None:
    plans = domain.plan_shipments(
        [
            AllocatedLine(line_no=1, sku="A", qty=2, warehouse_id="east"),
            AllocatedLine(line_no=2, sku="B", qty=1, warehouse_id="west"),
            AllocatedLine(line_no=3, sku="C", qty=4, warehouse_id="east"),
        ]
    )
    assert [(p.warehouse_id, [line.line_no for line in p.lines]) for p in plans] == [("east", [1, 3]), ("west", [2])]


def test_dispatch_lines_default_to_all_and_refuse_what_is_not_in_the_shipment() -> None:
    allocated = [LineQuantity(line_no=1, sku="A", qty=2), LineQuantity(line_no=2, sku="B", qty=1)]
    assert domain.dispatch_lines(allocated, None) == tuple(allocated)
    part = [LineQuantity(line_no=1, sku="A", qty=1)]
    assert domain.dispatch_lines(allocated, part) == tuple(part)
    with pytest.raises(domain.InvalidDispatchLines, match="not part"):
        domain.dispatch_lines(allocated, [LineQuantity(line_no=3, sku="C", qty=1)])
    with pytest.raises(domain.InvalidDispatchLines, match="3 asked, 2"):
        domain.dispatch_lines(allocated, [LineQuantity(line_no=1, sku="A", qty=3)])
    with pytest.raises(domain.InvalidDispatchLines, match="at least one"):
        domain.dispatch_lines(allocated, [])


def test_what_a_partial_dispatch_leaves_behind() -> None:
    allocated = [LineQuantity(line_no=1, sku="A", qty=3), LineQuantity(line_no=2, sku="B", qty=1)]
    assert domain.remaining_lines(allocated, [LineQuantity(line_no=1, sku="A", qty=1)]) == (
        LineQuantity(line_no=1, sku="A", qty=2),
        LineQuantity(line_no=2, sku="B", qty=1),
    )
    assert domain.remaining_lines(allocated, [LineQuantity(line_no=2, sku="B", qty=1)]) == (allocated[0],)
    assert domain.remaining_lines(allocated, allocated) == ()


SHIPPED_LINES = [LineQuantity(line_no=1, sku="A", qty=2), LineQuantity(line_no=2, sku="B", qty=1)]


@pytest.mark.parametrize(
    ("delivered", "message"),
    [
        ([DeliveredLine(line_no=3, sku="C", qty_delivered=1)], "not shipped"),
        ([DeliveredLine(line_no=1, sku="B", qty_delivered=1)], "not shipped"),
        ([DeliveredLine(line_no=1, sku="A", qty_delivered=3)], "3 delivered, 2 shipped"),
        (
            [DeliveredLine(line_no=1, sku="A", qty_delivered=2), DeliveredLine(line_no=1, sku="A", qty_delivered=1)],
            "3 delivered, 2 shipped",
        ),
        ([DeliveredLine(line_no=1, sku="A", qty_delivered=1, qty_damaged=2)], "2 damaged of 1"),
        ([], "at least one line"),
        ([DeliveredLine(line_no=1, sku="A", qty_delivered=0)], "no units"),
    ],
)
def test_delivered_lines_must_match_what_was_shipped(delivered: list[DeliveredLine], message: str) -> None:
    with pytest.raises(domain.InvalidDeliveredLines, match=message):
        domain.check_delivered_lines(SHIPPED_LINES, delivered)


def test_a_short_or_damaged_delivery_of_shipped_lines_is_accepted() -> None:
    domain.check_delivered_lines(SHIPPED_LINES, [DeliveredLine(line_no=1, sku="A", qty_delivered=1, qty_damaged=1)])
    domain.check_delivered_lines(
        SHIPPED_LINES,
        [DeliveredLine(line_no=1, sku="A", qty_delivered=2), DeliveredLine(line_no=2, sku="B", qty_delivered=1)],
    )


def test_the_promise_follows_the_carrier_actually_used_at_dispatch() -> None:
    ship_by = ALLOCATED + DAY
    promised = ship_by + DAY
    slower = domain.promise_at_dispatch(
        promised,
        PromiseReason.SERVICE_LEVEL,
        ship_by,
        ALLOCATED + 2 * HOUR,
        usual_transit=DAY,
        actual_transit=2 * DAY,
    )
    assert slower == ship_by + 2 * DAY
    # Dispatched late with a faster carrier: from the actual dispatch.
    late = ship_by + 5 * HOUR
    faster = domain.promise_at_dispatch(
        promised + DAY, PromiseReason.SERVICE_LEVEL, ship_by, late, usual_transit=2 * DAY, actual_transit=DAY
    )
    assert faster == late + DAY
    same = domain.promise_at_dispatch(
        promised, PromiseReason.SERVICE_LEVEL, ship_by, ship_by, usual_transit=DAY, actual_transit=DAY
    )
    assert same is None
    # A requested date the slower carrier still meets stands.
    requested = ship_by + 5 * DAY
    assert (
        domain.promise_at_dispatch(
            requested, PromiseReason.REQUESTED_DATE, ship_by, ship_by, usual_transit=DAY, actual_transit=2 * DAY
        )
        is None
    )


def test_carrier_status_later_event_wins_and_delivered_is_final() -> None:
    t = ALLOCATED
    assert domain.supersedes(None, None, CarrierStatus.IN_TRANSIT, t)
    assert domain.supersedes(CarrierStatus.IN_TRANSIT, t, CarrierStatus.OUT_FOR_DELIVERY, t + HOUR)
    assert not domain.supersedes(CarrierStatus.OUT_FOR_DELIVERY, t + HOUR, CarrierStatus.IN_TRANSIT, t)
    # A delivered scan that arrives with an odd timestamp still ends the story.
    assert domain.supersedes(CarrierStatus.OUT_FOR_DELIVERY, t + HOUR, CarrierStatus.DELIVERED, t)
    assert not domain.supersedes(CarrierStatus.DELIVERED, t, CarrierStatus.EXCEPTION, t + DAY)


# -- delay detection ----------------------------------------------------------------

PENDING = ShipmentTimes(ShipmentStatus.PENDING, ship_by=ALLOCATED + DAY, promised_delivery_at=ALLOCATED + 4 * DAY)
SHIPPED = ShipmentTimes(ShipmentStatus.SHIPPED, ship_by=ALLOCATED + DAY, promised_delivery_at=ALLOCATED + 4 * DAY)


POLICY = domain.EscalationPolicy(escalate_after=24 * HOUR, max_escalations=2)


def detect(times: ShipmentTimes, last: datetime | None, now: datetime, count: int = 1) -> domain.DelayFinding | None:
    announced = domain.Announced(last, count) if last is not None else None
    return detect_delay(times, announced, now, policy=POLICY, transit_grace=12 * HOUR)


def test_nothing_to_announce_before_ship_by_or_before_the_promise() -> None:
    assert detect(PENDING, None, PENDING.ship_by) is None
    assert detect(SHIPPED, None, SHIPPED.promised_delivery_at) is None
    delivered = ShipmentTimes(ShipmentStatus.DELIVERED, PENDING.ship_by, PENDING.promised_delivery_at)
    assert detect(delivered, None, ALLOCATED + 30 * DAY) is None


def test_late_dispatch_is_announced_with_the_promise_slipped_by_the_lateness() -> None:
    now = PENDING.ship_by + 3 * HOUR
    finding = detect(PENDING, None, now)
    assert finding is not None
    assert finding.stage is DelayStage.DISPATCH
    assert not finding.escalation
    assert finding.new_estimate == PENDING.promised_delivery_at + 3 * HOUR
    assert "3.0 h late" in finding.reason


def test_an_announced_delay_is_repeated_only_as_an_escalation_after_the_further_delay() -> None:
    announced = PENDING.ship_by + HOUR
    assert detect(PENDING, announced, announced + 23 * HOUR) is None
    finding = detect(PENDING, announced, announced + 24 * HOUR)
    assert finding is not None
    assert finding.escalation
    assert ": still late" in finding.reason


def test_escalations_stop_at_the_cap() -> None:
    announced = PENDING.ship_by + HOUR
    # POLICY allows two escalations: the first notice plus two, then silence however late.
    assert detect(PENDING, announced, announced + DAY, count=1) is not None
    assert detect(PENDING, announced, announced + DAY, count=2) is not None
    assert detect(PENDING, announced, announced + 30 * DAY, count=3) is None


def test_the_next_check_is_the_deadline_then_each_escalation_then_never() -> None:
    assert domain.next_delay_check(PENDING, None, POLICY) == PENDING.ship_by
    assert domain.next_delay_check(SHIPPED, None, POLICY) == SHIPPED.promised_delivery_at
    last = PENDING.ship_by + HOUR
    assert domain.next_delay_check(PENDING, domain.Announced(last, 1), POLICY) == last + 24 * HOUR
    assert domain.next_delay_check(PENDING, domain.Announced(last, 3), POLICY) is None
    delivered = ShipmentTimes(ShipmentStatus.DELIVERED, PENDING.ship_by, PENDING.promised_delivery_at)
    assert domain.next_delay_check(delivered, None, POLICY) is None


def test_late_transit_estimate_prefers_a_current_promise_still_ahead() -> None:
    now = SHIPPED.promised_delivery_at + 2 * HOUR
    moved = ShipmentTimes(
        ShipmentStatus.SHIPPED, SHIPPED.ship_by, SHIPPED.promised_delivery_at, current_promise=now + 5 * HOUR
    )
    finding = detect(moved, None, now)
    assert finding is not None
    assert finding.new_estimate == now + 5 * HOUR


def test_late_transit_uses_the_carriers_estimate_when_it_is_still_ahead() -> None:
    now = SHIPPED.promised_delivery_at + 2 * HOUR
    finding = detect(SHIPPED, None, now)
    assert finding is not None
    assert finding.stage is DelayStage.TRANSIT
    assert finding.new_estimate == now + 12 * HOUR
    with_estimate = ShipmentTimes(
        ShipmentStatus.SHIPPED, SHIPPED.ship_by, SHIPPED.promised_delivery_at, carrier_estimate=now + DAY
    )
    assert (found := detect(with_estimate, None, now)) is not None
    assert found.new_estimate == now + DAY
    stale = ShipmentTimes(ShipmentStatus.SHIPPED, SHIPPED.ship_by, SHIPPED.promised_delivery_at, now - HOUR)
    assert (found := detect(stale, None, now)) is not None
    assert found.new_estimate == now + 12 * HOUR


# -- webhook signatures -------------------------------------------------------------

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
BODY = b'{"event_id":"e1"}'


def verify(timestamp: str | None, signature: str | None, body: bytes = BODY, secret: str = "s3cret") -> None:
    signing.verify([secret], timestamp, signature, body, now=NOW, tolerance=timedelta(minutes=5))


def test_a_correct_signature_within_five_minutes_is_accepted() -> None:
    ts = int(NOW.timestamp()) - 299
    verify(str(ts), signing.sign("s3cret", ts, BODY))


@pytest.mark.parametrize(
    ("timestamp_offset", "secret", "body", "message"),
    [
        (0, "wrong", BODY, "does not match"),
        (0, "s3cret", BODY + b" ", "does not match"),
        (-301, "s3cret", BODY, "too far"),
        (301, "s3cret", BODY, "too far"),
    ],
)
def test_a_bad_or_stale_signature_is_rejected(timestamp_offset: int, secret: str, body: bytes, message: str) -> None:
    ts = int(NOW.timestamp()) + timestamp_offset
    with pytest.raises(signing.SignatureRejected, match=message):
        verify(str(ts), signing.sign(secret, ts, BODY), body=body)


def test_while_a_carrier_rotates_its_secret_both_are_accepted() -> None:
    ts = int(NOW.timestamp())
    for secret in ("old-secret", "new-secret"):
        signing.verify(
            ["new-secret", "old-secret"], str(ts), signing.sign(secret, ts, BODY), BODY, now=NOW, tolerance=HOUR
        )
    with pytest.raises(signing.SignatureRejected, match="does not match"):
        signing.verify(["new-secret"], str(ts), signing.sign("old-secret", ts, BODY), BODY, now=NOW, tolerance=HOUR)


def test_missing_or_malformed_signature_headers_are_rejected() -> None:
    with pytest.raises(signing.SignatureRejected, match="required"):
        verify(None, "sha256=00")
    with pytest.raises(signing.SignatureRejected, match="unix seconds"):
        verify("yesterday", "sha256=00")
