"""Use cases of the shipping service: load, apply the domain rules, write state and the
events it implies (outbox) in one transaction.

Functions called from event handlers never commit (the consumer loop does); functions
called from routes and the delay scanner commit once at the end.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from fulfil.db import SessionFactory
from fulfil.events import (
    CustomerTier,
    DelayStage,
    DeliveredLine,
    LineQuantity,
    OrderAllocated,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderEvent,
    OrderReceived,
    OrderShipped,
    ServiceLevel,
)
from fulfil.outbox import stage_events
from fulfil.problems import PROBLEM_BASE, Conflict, NotFound, Problem
from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from shipping import domain, metrics
from shipping.config import Settings
from shipping.domain import CarrierStatus, OrderTerms, PromiseReason, ShipmentStatus
from shipping.models import (
    CarrierEvent,
    CarrierEventAck,
    CarrierEventRow,
    CarrierExceptionNoticeRow,
    DelayNoticeRow,
    DispatchRequest,
    OrderTermsRow,
    ShipmentList,
    ShipmentPublic,
    ShipmentRow,
    TimelineEntry,
    TimelineRow,
)

log = logging.getLogger(__name__)

SHIPMENT_NAMESPACE = uuid.UUID("6f1c2a52-3b8e-4d55-9a3c-5f0e8e1d7b21")
SCAN_BATCH = 500


class ShipmentNotFound(NotFound):
    type = PROBLEM_BASE + "shipment-not-found"


class ShipmentCancelled(Conflict):
    type = PROBLEM_BASE + "shipment-cancelled"
    title = "Shipment cancelled"


class AlreadyDispatched(Conflict):
    type = PROBLEM_BASE + "already-dispatched"
    title = "Already dispatched"


class InvalidDispatch(Problem):
    status = 422
    type = PROBLEM_BASE + "invalid-dispatch"
    title = "Invalid dispatch"


class InvalidCarrierEvent(Problem):
    status = 422
    type = PROBLEM_BASE + "invalid-carrier-event"
    title = "Invalid carrier event"


class InvalidCursor(Problem):
    status = 400
    type = PROBLEM_BASE + "invalid-cursor"
    title = "Invalid cursor"


# -- consuming order events (no commit: the consumer loop owns the transaction) ---------


async def record_order_terms(session: AsyncSession, settings: Settings, event: OrderReceived) -> None:
    """Copy what the promise needs from the order. Pending shipments promised on default
    terms (their allocation was seen first) get the promise the order's terms give."""
    row = await session.get(OrderTermsRow, event.order_id) or OrderTermsRow(order_id=event.order_id)
    row.received = True
    row.service_level = event.service_level.value
    row.requested_delivery_date = event.requested_delivery_date
    row.placed_at = event.placed_at
    row.customer_tier = event.customer.tier.value
    session.add(row)
    terms = _terms(row)
    placeholders = await session.exec(
        select(ShipmentRow)
        .where(
            ShipmentRow.order_id == event.order_id,
            ShipmentRow.status == ShipmentStatus.PENDING.value,
            ShipmentRow.promise_reason == PromiseReason.ORDER_TERMS_UNKNOWN.value,
        )
        .with_for_update()
    )
    for shipment in placeholders:
        # The terms change the promised delivery, never the ship-by the allocation set.
        handling = shipment.ship_by - shipment.allocated_at
        promise = _promise(settings, shipment.warehouse_id, shipment.allocated_at, terms, handling)
        _change_promise(session, shipment, promise.promised_delivery_at, promise.reason, event.occurred_at)
        # The default promise was never the order's own: the first real one becomes the original.
        shipment.original_promised_delivery_at = promise.promised_delivery_at
        shipment.promise_reason = promise.reason.value
        shipment.service_level = terms.service_level.value
        shipment.customer_tier = terms.customer_tier.value
        session.add(shipment)


def _promise(
    settings: Settings, warehouse_id: str, allocated_at: datetime, terms: OrderTerms, handling: timedelta
) -> domain.Promise:
    carrier = settings.carrier_for(warehouse_id)
    return domain.make_promise(
        allocated_at,
        terms,
        handling=handling,
        transit=settings.transit_for(carrier, terms.service_level),
        compression=settings.time_compression,
    )


async def create_shipments(
    session: AsyncSession, settings: Settings, event: OrderAllocated, *, event_id: str
) -> list[ShipmentRow]:
    """One pending shipment per warehouse of the allocation, unless the order was cancelled."""
    row = await session.get(OrderTermsRow, event.order_id)
    if row is not None and row.cancelled_at is not None:
        log.info("order %s was cancelled before allocation: no shipment", event.order_id)
        return []
    terms = _terms(row)
    shipments = []
    for planned in domain.plan_shipments(event.allocations):
        handling = settings.handling_for(planned.warehouse_id, event.handling_hours.get(planned.warehouse_id))
        promise = _promise(settings, planned.warehouse_id, event.occurred_at, terms, handling)
        # Derived from the event id, so a handler re-run after a rollback makes the same ids.
        shipment_id = "shp_" + uuid.uuid5(SHIPMENT_NAMESPACE, f"{event_id}/{planned.warehouse_id}").hex[:20]
        shipment = ShipmentRow(
            id=shipment_id,
            order_id=event.order_id,
            warehouse_id=planned.warehouse_id,
            status=ShipmentStatus.PENDING.value,
            lines=[line.model_dump() for line in planned.lines],
            allocated_at=event.occurred_at,
            ship_by=promise.ship_by,
            original_promised_delivery_at=promise.promised_delivery_at,
            promised_delivery_at=promise.promised_delivery_at,
            promise_reason=promise.reason.value,
            service_level=terms.service_level.value,
            customer_tier=terms.customer_tier.value,
            next_check_at=promise.ship_by,
        )
        session.add(shipment)
        _note(
            session,
            shipment_id,
            event.occurred_at,
            "created",
            ship_by=promise.ship_by.isoformat(),
            promised_delivery_at=promise.promised_delivery_at.isoformat(),
            reason=promise.reason.value,
        )
        shipments.append(shipment)
    return shipments


async def cancel_order(session: AsyncSession, event: OrderCancelled) -> None:
    """Cancel the order's pending shipments; dispatched ones stay, with the refusal recorded.
    The cancellation is remembered so an allocation arriving later ships nothing."""
    terms = await session.get(OrderTermsRow, event.order_id) or OrderTermsRow(order_id=event.order_id)
    if terms.cancelled_at is None:
        terms.cancelled_at = event.occurred_at
        terms.cancel_reason = event.reason
        session.add(terms)
    shipments = await session.exec(select(ShipmentRow).where(ShipmentRow.order_id == event.order_id).with_for_update())
    for shipment in shipments:
        if shipment.status == ShipmentStatus.PENDING:
            shipment.status = ShipmentStatus.CANCELLED.value
            shipment.cancelled_at = event.occurred_at
            shipment.next_check_at = None
            session.add(shipment)
            _note(session, shipment.id, event.occurred_at, "cancelled", reason=event.reason)
        elif shipment.status != ShipmentStatus.CANCELLED:
            _note(
                session, shipment.id, event.occurred_at, "cancel_refused", reason=event.reason, status=shipment.status
            )


def _terms(row: OrderTermsRow | None) -> OrderTerms:
    if row is None or not row.received:
        return domain.UNKNOWN_TERMS
    return OrderTerms(
        service_level=ServiceLevel(row.service_level),
        requested_delivery_date=row.requested_delivery_date,
        placed_at=row.placed_at,
        customer_tier=CustomerTier(row.customer_tier),
    )


# -- queries -------------------------------------------------------------------------


async def list_shipments(
    session: AsyncSession, *, order_id: str | None, status: ShipmentStatus | None, limit: int, cursor: str | None = None
) -> ShipmentList:
    """One page of shipments, earliest ship-by first; ``next_cursor`` continues after it."""
    query = select(ShipmentRow)
    if order_id is not None:
        query = query.where(ShipmentRow.order_id == order_id)
    if status is not None:
        query = query.where(ShipmentRow.status == status.value)
    if cursor is not None:
        after_ship_by, after_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                col(ShipmentRow.ship_by) > after_ship_by,
                and_(col(ShipmentRow.ship_by) == after_ship_by, col(ShipmentRow.id) > after_id),
            )
        )
    query = query.order_by(col(ShipmentRow.ship_by), col(ShipmentRow.id)).limit(limit + 1)
    rows = list(await session.exec(query))
    page, more = rows[:limit], len(rows) > limit
    return ShipmentList(
        items=[public(row) for row in page], next_cursor=_encode_cursor(page[-1]) if more and page else None
    )


def _encode_cursor(row: ShipmentRow) -> str:
    raw = json.dumps([row.ship_by.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        ship_by, shipment_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = datetime.fromisoformat(ship_by)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this API returned") from exc
    if after.tzinfo is None or not isinstance(shipment_id, str):
        raise InvalidCursor("cursor is not one this API returned")
    return after, shipment_id


async def get_shipment(session: AsyncSession, shipment_id: str) -> ShipmentPublic:
    row = await session.get(ShipmentRow, shipment_id)
    if row is None:
        raise ShipmentNotFound(f"no shipment {shipment_id}")
    timeline = await session.exec(
        select(TimelineRow).where(TimelineRow.shipment_id == shipment_id).order_by(col(TimelineRow.id))
    )
    return public(row, [TimelineEntry(at=t.at, kind=t.kind, detail=t.detail) for t in timeline])


def public(row: ShipmentRow, timeline: Sequence[TimelineEntry] = ()) -> ShipmentPublic:
    return ShipmentPublic.model_validate({**row.model_dump(), "timeline": list(timeline)})


# -- warehouse dispatch ---------------------------------------------------------------


async def dispatch(
    session: AsyncSession, settings: Settings, shipment_id: str, request: DispatchRequest, now: datetime
) -> ShipmentPublic:
    """The shipment leaves the warehouse: order.shipped is staged in the same transaction.
    The same dispatch again is a no-op; a different one, or a cancelled shipment, is a conflict.
    Lines left behind by a partial dispatch move to a new pending shipment with the same
    ship-by and promises, so delay detection keeps watching them."""
    shipment = (await session.exec(select(ShipmentRow).where(ShipmentRow.id == shipment_id).with_for_update())).first()
    if shipment is None:
        raise ShipmentNotFound(f"no shipment {shipment_id}")
    if shipment.status == ShipmentStatus.CANCELLED:
        raise ShipmentCancelled(f"shipment {shipment_id} was cancelled; it cannot be dispatched")
    if shipment.status != ShipmentStatus.PENDING:
        if (shipment.carrier, shipment.tracking_number) == (request.carrier, request.tracking_number):
            return await get_shipment(session, shipment_id)
        raise AlreadyDispatched(
            f"shipment {shipment_id} already left with {shipment.carrier} {shipment.tracking_number}"
        )
    if request.carrier not in settings.carriers:
        raise InvalidDispatch(f"unknown carrier {request.carrier!r}; known: {sorted(settings.carriers)}")
    shipped_at = request.dispatched_at or now
    if shipped_at > now + settings.clock_skew:
        raise InvalidDispatch("dispatched_at is in the future")
    if shipped_at < shipment.allocated_at - settings.clock_skew:
        raise InvalidDispatch(f"dispatched_at is before the allocation at {shipment.allocated_at.isoformat()}")
    allocated = [LineQuantity.model_validate(line) for line in shipment.lines]
    try:
        lines = domain.dispatch_lines(allocated, request.lines)
    except domain.InvalidDispatchLines as exc:
        raise InvalidDispatch(str(exc)) from None
    rest = domain.remaining_lines(allocated, lines)
    # Read before anything changes: no autoflush may run the tracking-number check early.
    notice = await session.get(DelayNoticeRow, (shipment.id, DelayStage.DISPATCH.value)) if rest else None

    late = shipped_at > shipment.ship_by
    shipment.status = ShipmentStatus.SHIPPED.value
    shipment.carrier = request.carrier
    shipment.tracking_number = request.tracking_number
    shipment.shipped_at = shipped_at
    shipment.shipped_lines = [line.model_dump() for line in lines]
    shipment.late_dispatch = shipment.late_dispatch or late
    _note(
        session,
        shipment.id,
        shipped_at,
        "dispatched",
        carrier=request.carrier,
        tracking_number=request.tracking_number,
        late=late,
    )
    if rest:
        _split_off_remainder(session, settings, shipment, notice, lines, rest, shipped_at)
    _repromise_for_carrier(session, settings, shipment, request.carrier, shipped_at)
    # Transit lateness is measured against the original promise, so that is when to look next.
    shipment.next_check_at = shipment.original_promised_delivery_at
    session.add(shipment)
    stage_events(
        session,
        settings,
        [
            OrderShipped(
                order_id=shipment.order_id,
                occurred_at=shipped_at,
                shipment_id=shipment.id,
                warehouse_id=shipment.warehouse_id,
                carrier=request.carrier,
                tracking_number=request.tracking_number,
                lines=lines,
                ship_by=shipment.ship_by,
                # What was promised, not today's estimate: a late shipment stays late.
                promised_delivery_at=shipment.original_promised_delivery_at,
            )
        ],
    )
    try:
        await session.commit()
    except IntegrityError:
        # The unique (carrier, tracking_number) index, not a read-then-insert, decides.
        await session.rollback()
        holder = (
            await session.exec(
                select(ShipmentRow.id).where(
                    ShipmentRow.carrier == request.carrier, ShipmentRow.tracking_number == request.tracking_number
                )
            )
        ).first()
        if holder == shipment_id:
            return await get_shipment(session, shipment_id)
        if holder is not None:
            raise AlreadyDispatched(
                f"{request.carrier} tracking number {request.tracking_number} is already used by shipment {holder}"
            ) from None
        raise
    return await get_shipment(session, shipment_id)


def _split_off_remainder(
    session: AsyncSession,
    settings: Settings,
    shipment: ShipmentRow,
    notice: DelayNoticeRow | None,
    dispatched: Sequence[LineQuantity],
    rest: Sequence[LineQuantity],
    at: datetime,
) -> ShipmentRow:
    """What a partial dispatch left behind becomes a pending shipment of its own, keeping
    ship-by, both promises and any dispatch delay already announced (not announced twice)."""
    remainder_id = "shp_" + uuid.uuid5(SHIPMENT_NAMESPACE, f"{shipment.id}/remainder").hex[:20]
    remainder = ShipmentRow(
        id=remainder_id,
        order_id=shipment.order_id,
        warehouse_id=shipment.warehouse_id,
        status=ShipmentStatus.PENDING.value,
        lines=[line.model_dump() for line in rest],
        allocated_at=shipment.allocated_at,
        ship_by=shipment.ship_by,
        original_promised_delivery_at=shipment.original_promised_delivery_at,
        promised_delivery_at=shipment.promised_delivery_at,
        promise_reason=shipment.promise_reason,
        service_level=shipment.service_level,
        customer_tier=shipment.customer_tier,
        late_dispatch=shipment.late_dispatch,
        parent_shipment_id=shipment.id,
    )
    announced: domain.Announced | None = None
    if notice is not None:
        session.add(
            DelayNoticeRow(
                shipment_id=remainder_id,
                stage=notice.stage,
                first_announced_at=notice.first_announced_at,
                last_announced_at=notice.last_announced_at,
                announcements=notice.announcements,
            )
        )
        announced = domain.Announced(notice.last_announced_at, notice.announcements)
    remainder.next_check_at = domain.next_delay_check(_times(remainder), announced, settings.escalation)
    session.add(remainder)
    _note(
        session,
        remainder_id,
        at,
        "created",
        split_from=shipment.id,
        ship_by=remainder.ship_by.isoformat(),
        promised_delivery_at=remainder.promised_delivery_at.isoformat(),
        reason=remainder.promise_reason,
    )
    _note(
        session,
        shipment.id,
        at,
        "split",
        remainder_shipment_id=remainder_id,
        left_behind=[line.model_dump() for line in rest],
    )
    # Each unit belongs to one shipment: this one is now what left.
    shipment.lines = [line.model_dump() for line in dispatched]
    shipment.remainder_shipment_id = remainder_id
    return remainder


def _repromise_for_carrier(
    session: AsyncSession, settings: Settings, shipment: ShipmentRow, carrier: str, shipped_at: datetime
) -> None:
    """The promise was made with the warehouse's usual carrier; if the one actually used is
    faster or slower, the current promise follows it (the original stays what was promised)."""
    level = ServiceLevel(shipment.service_level)
    usual = settings.transit_for(settings.carrier_for(shipment.warehouse_id), level)
    actual = settings.transit_for(carrier, level)
    moved = domain.promise_at_dispatch(
        shipment.promised_delivery_at,
        PromiseReason(shipment.promise_reason),
        shipment.ship_by,
        shipped_at,
        usual_transit=usual,
        actual_transit=actual,
    )
    if moved is not None:
        _change_promise(session, shipment, moved, PromiseReason.DISPATCH_CARRIER, shipped_at)


def _times(shipment: ShipmentRow) -> domain.ShipmentTimes:
    return domain.ShipmentTimes(
        status=ShipmentStatus(shipment.status),
        ship_by=shipment.ship_by,
        promised_delivery_at=shipment.original_promised_delivery_at,
        carrier_estimate=shipment.carrier_estimate,
        current_promise=shipment.promised_delivery_at,
    )


# -- carrier tracking -----------------------------------------------------------------


async def record_carrier_event(
    session: AsyncSession, settings: Settings, carrier: str, event: CarrierEvent, now: datetime
) -> CarrierEventAck:
    """Apply one verified tracking event: replays are no-ops, older scans are only recorded,
    delivered becomes order.delivered and an exception order.delayed (once per reason,
    then only as capped escalations).

    Event times are bounded: more than the clock skew ahead of now, or before the shipment
    left (beyond the skew), is refused; a scan within the skew before dispatch is clamped
    to the dispatch time, so no parcel arrives before it left."""
    if (seen := await session.get(CarrierEventRow, (carrier, event.event_id))) is not None:
        return CarrierEventAck(event_id=event.event_id, shipment_id=seen.shipment_id, outcome="duplicate")
    if event.status is CarrierStatus.EXCEPTION and event.reason is None:
        raise InvalidCarrierEvent("an exception event needs a reason")
    skew = settings.clock_skew
    if event.occurred_at > now + skew:
        raise InvalidCarrierEvent(
            f"occurred_at {event.occurred_at.isoformat()} is in the future (now {now.isoformat()})"
        )
    if event.estimated_delivery_at is not None and event.estimated_delivery_at < event.occurred_at:
        raise InvalidCarrierEvent("estimated_delivery_at is before the scan itself")
    shipment = (
        await session.exec(
            select(ShipmentRow)
            .where(ShipmentRow.carrier == carrier, ShipmentRow.tracking_number == event.tracking_number)
            .with_for_update()
        )
    ).first()
    if shipment is None:
        raise ShipmentNotFound(f"no shipment with {carrier} tracking number {event.tracking_number}")
    occurred_at = event.occurred_at
    clamped = False
    if shipment.shipped_at is not None and occurred_at < shipment.shipped_at:
        if occurred_at < shipment.shipped_at - skew:
            raise InvalidCarrierEvent(
                f"occurred_at {occurred_at.isoformat()} is before the shipment left "
                f"at {shipment.shipped_at.isoformat()}"
            )
        occurred_at, clamped = shipment.shipped_at, True
    shipped = [LineQuantity.model_validate(line) for line in shipment.shipped_lines or shipment.lines]
    if event.status is CarrierStatus.DELIVERED and event.lines is not None:
        try:
            domain.check_delivered_lines(shipped, event.lines)
        except domain.InvalidDeliveredLines as exc:
            raise InvalidCarrierEvent(str(exc)) from None

    current = CarrierStatus(shipment.carrier_status) if shipment.carrier_status else None
    applies = domain.supersedes(current, shipment.carrier_status_at, event.status, occurred_at)
    announces = applies and event.status is CarrierStatus.EXCEPTION and shipment.status == ShipmentStatus.SHIPPED
    notice: CarrierExceptionNoticeRow | None = None
    if announces and event.reason is not None:
        # Read before anything is added: a concurrent replay must fail at commit (-> duplicate).
        notice = await session.get(CarrierExceptionNoticeRow, (shipment.id, event.reason.value))
    session.add(
        CarrierEventRow(
            carrier=carrier,
            event_id=event.event_id,
            shipment_id=shipment.id,
            status=event.status.value,
            occurred_at=occurred_at,
            received_at=now,
            applied=applies,
        )
    )
    detail: dict[str, Any] = {"event_id": event.event_id, "applied": applies}
    if clamped:
        detail["clamped_from"] = event.occurred_at.isoformat()
    delayed: OrderDelayed | None = None
    if event.reason is not None:
        detail["reason"] = event.reason.value
    if announces:
        delayed = _announce_exception(session, settings, shipment, notice, event, occurred_at)
        detail["announced"] = delayed is not None
    _note(session, shipment.id, occurred_at, f"carrier_{event.status.value}", **detail)

    emitted: list[OrderEvent] = []
    if applies:
        shipment.carrier_status = event.status.value
        shipment.carrier_status_at = occurred_at
        if event.estimated_delivery_at is not None:
            shipment.carrier_estimate = event.estimated_delivery_at
            _change_promise(session, shipment, event.estimated_delivery_at, PromiseReason.CARRIER_ESTIMATE, now)
        if event.status is CarrierStatus.DELIVERED and shipment.status == ShipmentStatus.SHIPPED:
            emitted.append(_deliver(session, shipment, shipped, event, occurred_at))
        elif delayed is not None:
            emitted.append(delayed)
        session.add(shipment)
    stage_events(session, settings, emitted)
    try:
        await session.commit()
    except IntegrityError:
        # The same event id posted twice at once: the other request applied it.
        await session.rollback()
        return CarrierEventAck(event_id=event.event_id, shipment_id=shipment.id, outcome="duplicate")
    if delayed is not None:
        metrics.DELAY_NOTICES.labels(delayed.stage.value, str(domain.is_escalation(delayed.reason)).lower()).inc()
    return CarrierEventAck(
        event_id=event.event_id, shipment_id=shipment.id, outcome="applied" if applies else "recorded"
    )


def _announce_exception(
    session: AsyncSession,
    settings: Settings,
    shipment: ShipmentRow,
    notice: CarrierExceptionNoticeRow | None,
    event: CarrierEvent,
    at: datetime,
) -> OrderDelayed | None:
    """order.delayed for a carrier exception: once per (shipment, reason); the same trouble
    reported again is announced only as an escalation (after the further delay, or when the
    carrier's estimate slips later), at most ``delay_max_escalations`` times."""
    assert event.reason is not None
    estimate = event.estimated_delivery_at
    escalation = notice is not None
    if notice is None:
        notice = CarrierExceptionNoticeRow(
            shipment_id=shipment.id,
            reason=event.reason.value,
            first_announced_at=at,
            last_announced_at=at,
            announced_estimate=estimate,
        )
    else:
        slipped = estimate is not None and (notice.announced_estimate is None or estimate > notice.announced_estimate)
        announced = domain.Announced(notice.last_announced_at, notice.announcements)
        if not (slipped and announced.count <= settings.delay_max_escalations) and not domain.may_announce(
            announced, at, settings.escalation
        ):
            return None
        notice.last_announced_at = at
        notice.announcements += 1
        if estimate is not None:
            notice.announced_estimate = estimate
    session.add(notice)
    return OrderDelayed(
        order_id=shipment.order_id,
        occurred_at=at,
        shipment_id=shipment.id,
        stage=DelayStage.CARRIER_EXCEPTION,
        reason=domain.delay_reason(event.reason.value, event.description, escalation=escalation),
        new_estimate=estimate,
    )


def _deliver(
    session: AsyncSession,
    shipment: ShipmentRow,
    shipped: Sequence[LineQuantity],
    event: CarrierEvent,
    delivered_at: datetime,
) -> OrderDelivered:
    lines = event.lines or [
        DeliveredLine(line_no=line.line_no, sku=line.sku, qty_delivered=line.qty) for line in shipped
    ]
    shipment.status = ShipmentStatus.DELIVERED.value
    shipment.delivered_at = delivered_at
    shipment.delivered_lines = [line.model_dump() for line in lines]
    shipment.signed_by = event.signed_by
    shipment.next_check_at = None
    # Measured against the original promise; a shipment already announced late stays late.
    shipment.late_delivery = shipment.late_delivery or delivered_at > shipment.original_promised_delivery_at
    _note(session, shipment.id, delivered_at, "delivered", late=shipment.late_delivery, signed_by=event.signed_by)
    return OrderDelivered(
        order_id=shipment.order_id,
        occurred_at=delivered_at,
        shipment_id=shipment.id,
        lines=tuple(lines),
        delivered_at=delivered_at,
    )


# -- delay detection ------------------------------------------------------------------


async def scan_for_delays(sessions: SessionFactory, settings: Settings, now: datetime) -> list[OrderDelayed]:
    """Announce shipments late to dispatch or late in transit (once per stage, then only
    capped escalations), with a new estimate; return what was staged.

    Only shipments whose ``next_check_at`` has come are looked at, and each look moves it
    on (to the next escalation, or to never), so long-late shipments cannot fill the
    batch and starve newer delays."""
    async with sessions() as session:
        due = (
            await session.exec(
                select(ShipmentRow)
                .where(col(ShipmentRow.next_check_at).is_not(None), col(ShipmentRow.next_check_at) <= now)
                .order_by(col(ShipmentRow.next_check_at), col(ShipmentRow.id))
                .limit(SCAN_BATCH)
                # Replicas scanning at once each take different shipments (PostgreSQL).
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not due:
            return []
        notices = {
            (n.shipment_id, n.stage): n
            for n in await session.exec(
                select(DelayNoticeRow).where(col(DelayNoticeRow.shipment_id).in_([s.id for s in due]))
            )
        }
        announced: list[OrderDelayed] = []
        escalations: list[bool] = []
        for shipment in due:
            times = _times(shipment)
            stage = domain.stage_of(times.status)
            notice = notices.get((shipment.id, stage.value)) if stage is not None else None
            finding = domain.detect_delay(
                times,
                domain.Announced(notice.last_announced_at, notice.announcements) if notice else None,
                now,
                policy=settings.escalation,
                transit_grace=settings.transit_grace,
            )
            if finding is not None:
                notice = _record_notice(session, shipment, notice, finding, now)
                escalations.append(finding.escalation)
                announced.append(
                    OrderDelayed(
                        order_id=shipment.order_id,
                        occurred_at=now,
                        shipment_id=shipment.id,
                        stage=finding.stage,
                        reason=finding.reason,
                        new_estimate=finding.new_estimate,
                    )
                )
            shipment.next_check_at = domain.next_delay_check(
                times,
                domain.Announced(notice.last_announced_at, notice.announcements) if notice else None,
                settings.escalation,
            )
            session.add(shipment)
        stage_events(session, settings, announced)
        await session.commit()
        for delayed, escalation in zip(announced, escalations, strict=True):
            metrics.DELAY_NOTICES.labels(delayed.stage.value, str(escalation).lower()).inc()
        return announced


def _record_notice(
    session: AsyncSession,
    shipment: ShipmentRow,
    notice: DelayNoticeRow | None,
    finding: domain.DelayFinding,
    now: datetime,
) -> DelayNoticeRow:
    if notice is None:
        notice = DelayNoticeRow(
            shipment_id=shipment.id, stage=finding.stage.value, first_announced_at=now, last_announced_at=now
        )
    else:
        notice.last_announced_at = now
        notice.announcements += 1
    session.add(notice)
    if finding.stage is DelayStage.DISPATCH:
        shipment.late_dispatch = True
        reason = PromiseReason.DISPATCH_LATE
    else:
        shipment.late_delivery = True
        reason = PromiseReason.TRANSIT_LATE
    if finding.new_estimate is not None:
        _change_promise(session, shipment, finding.new_estimate, reason, now)
    _note(session, shipment.id, now, "delay_announced", stage=finding.stage.value, escalation=finding.escalation)
    return notice


# -- helpers --------------------------------------------------------------------------


def _change_promise(
    session: AsyncSession, shipment: ShipmentRow, new: datetime, reason: PromiseReason, at: datetime
) -> None:
    if new == shipment.promised_delivery_at:
        return
    _note(
        session,
        shipment.id,
        at,
        "promise_changed",
        previous=shipment.promised_delivery_at.isoformat(),
        promised_delivery_at=new.isoformat(),
        reason=reason.value,
    )
    shipment.promised_delivery_at = new
    shipment.promise_reason = reason.value


def _note(session: AsyncSession, shipment_id: str, at: datetime, kind: str, **detail: Any) -> None:
    session.add(TimelineRow(shipment_id=shipment_id, at=at, kind=kind, detail=detail))
