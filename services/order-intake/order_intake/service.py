"""Use cases of order intake: load, apply the domain rules, write state and outbox, commit."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fulfil.codec import encode
from fulfil.consumer import AppliedEvent
from fulfil.db import SessionFactory
from fulfil.events import OrderCancelled, OrderEvent, OrderReceived, parse_event
from fulfil.outbox import WAKE_RELAY, OutboxRow, pack_headers, stage_events
from fulfil.problems import PROBLEM_BASE, PROBLEM_JSON, Conflict, NotFound, Problem
from fulfil.settings import ServiceSettings
from sqlalchemy import delete, insert, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from order_intake import domain
from order_intake.domain import OrderStatus
from order_intake.models import (
    ApiClient,
    CancelAccepted,
    DelayOut,
    IdempotencyRecord,
    Links,
    Order,
    OrderAccepted,
    OrderCreate,
    OrderDetail,
    OrderPage,
    OrderSummary,
    TimelineEntry,
    TimelineEntryOut,
    as_utc,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class ValidationProblem(Problem):
    status = 422
    title = "Validation failed"
    type = PROBLEM_BASE + "validation"


class IdempotencyKeyReused(Problem):
    status = 422
    title = "Idempotency-Key reused"
    type = PROBLEM_BASE + "idempotency-key-reused"


class DuplicateOrder(Conflict):
    type = PROBLEM_BASE + "duplicate-order"


class Unauthorized(Problem):
    status = 401
    title = "Unauthorized"
    type = PROBLEM_BASE + "unauthorized"


class TooManyRequests(Problem):
    status = 429
    title = "Too Many Requests"
    type = PROBLEM_BASE + "rate-limited"


class ServiceUnavailable(Problem):
    """The database is unreachable or the service is stopping: nothing was committed, retry."""

    status = 503
    title = "Service Unavailable"
    type = PROBLEM_BASE + "unavailable"


def problem_body(problem: Problem, instance: str) -> dict[str, Any]:
    """The problem+json body the app's handler renders, for storing an idempotent replay."""
    body: dict[str, Any] = {"type": problem.type, "title": problem.title, "status": problem.status}
    body["detail"] = problem.detail
    body["instance"] = instance
    body.update(problem.extensions)
    return body


# -- clients and keys -------------------------------------------------------------------


def new_api_key() -> str:
    return "fk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """SHA-256 is enough for 256-bit random keys: there is nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


MAX_CLIENT_NAME = 100


class InvalidClientName(ValueError):
    pass


def check_client_name(name: str) -> str:
    """1 to 100 printable characters: the name appears in every order.received event."""
    if not 1 <= len(name) <= MAX_CLIENT_NAME:
        raise InvalidClientName(f"a client name has 1 to {MAX_CLIENT_NAME} characters, not {len(name)}")
    if not name.isprintable() or name != name.strip():
        raise InvalidClientName("a client name has no control characters and no leading or trailing spaces")
    return name


async def create_client(session: AsyncSession, name: str, now: datetime) -> tuple[ApiClient, str]:
    """A new client and its key; the key is returned once and only its hash is stored."""
    check_client_name(name)
    key = new_api_key()
    client = ApiClient(id=f"cl_{uuid.uuid4().hex[:16]}", name=name, key_hash=hash_key(key), created_at=now)
    session.add(client)
    await session.commit()
    return client, key


async def issue_key(session: AsyncSession, name: str, now: datetime) -> tuple[ApiClient, str]:
    """The named client with a fresh key (created if missing): for dev set-ups, where the
    previous key cannot be shown again because only its hash is stored."""
    check_client_name(name)
    existing = (await session.exec(select(ApiClient).where(ApiClient.name == name))).first()
    if existing is None:
        try:
            return await create_client(session, name, now)
        except IntegrityError:
            await session.rollback()
            existing = (await session.exec(select(ApiClient).where(ApiClient.name == name))).one()
    key = new_api_key()
    existing.key_hash = hash_key(key)
    session.add(existing)
    await session.commit()
    return existing, key


async def authenticate(session: AsyncSession, key: str) -> ApiClient | None:
    return (await session.exec(select(ApiClient).where(ApiClient.key_hash == hash_key(key)))).first()


# -- accepting orders -------------------------------------------------------------------


def links(order_id: str) -> Links:
    return Links(self=f"/v1/orders/{order_id}", cancel=f"/v1/orders/{order_id}/cancel")


def received_event(client: ApiClient, body: OrderCreate, order_id: str, now: datetime) -> OrderReceived:
    # Validated from one plain dict: a third of the cost of building each nested model in Python.
    order = body.model_dump()
    customer = order["customer"]
    return OrderReceived.model_validate(
        {
            "order_id": order_id,
            "occurred_at": now,
            "client": client.name,
            "external_ref": body.external_ref,
            "customer": {
                "id": customer["id"],
                "tier": customer["tier"],
                "locale": customer["locale"],
                "contact": {"email": customer["email"], "phone": customer["phone"]},
            },
            "lines": order["lines"],
            "ship_to": order["ship_to"],
            "placed_at": body.placed_at or now,
            "requested_delivery_date": body.requested_delivery_date,
            "service_level": body.service_level,
            "allow_partial": body.allow_partial,
        }
    )


def new_order(client: ApiClient, body: OrderCreate, now: datetime) -> OrderReceived:
    """The order.received event of a new order, under a new order id."""
    return received_event(client, body, f"ord_{uuid.uuid4().hex}", now)


def accepted(event: OrderReceived) -> OrderAccepted:
    return OrderAccepted(
        order_id=event.order_id,
        external_ref=event.external_ref,
        status=OrderStatus.RECEIVED,
        links=links(event.order_id),
    )


def duplicate_order(external_ref: str, existing_order_id: str) -> DuplicateOrder:
    return DuplicateOrder(
        f"an order with external_ref {external_ref!r} already exists: {existing_order_id}",
        order_id=existing_order_id,
        external_ref=external_ref,
    )


def _timeline_row(event: OrderEvent, ce_id: str) -> TimelineEntry:
    return TimelineEntry(
        ce_id=ce_id,
        order_id=event.order_id,
        type=event.type,
        occurred_at=event.occurred_at,
        summary=domain.summarize(event),
        data=event.model_dump(mode="json"),
    )


def _insert_or_skip(connection: AsyncConnection) -> Any:
    """INSERT .. ON CONFLICT DO NOTHING, in the connection's dialect."""
    return postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert


async def insert_new_orders(
    session: AsyncSession, client: ApiClient, events: Sequence[OrderReceived], data: Sequence[dict[str, Any]]
) -> set[str]:
    """Insert the orders whose external_ref the client has not used yet; the ids of those inserted.

    The unique constraint decides, in the statement itself: an external_ref taken meanwhile by
    another request (or replica) skips that order instead of failing the others."""
    if not events:
        return set()
    connection = await session.connection()
    statement = (
        _insert_or_skip(connection)(Order)
        .on_conflict_do_nothing(index_elements=["client_id", "external_ref"])
        .returning(col(Order.order_id))
    )
    rows = [
        {
            "order_id": event.order_id,
            "client_id": client.id,
            "external_ref": event.external_ref,
            "customer_id": event.customer.id,
            "status": OrderStatus.RECEIVED.value,
            "delayed": False,
            "received_at": event.occurred_at,
            "updated_at": event.occurred_at,
            "order": order,
        }
        for event, order in zip(events, data, strict=True)
    ]
    return set((await connection.execute(statement, rows)).scalars())


async def stage_received(
    session: AsyncSession, settings: ServiceSettings, events: Sequence[OrderReceived], data: Sequence[dict[str, Any]]
) -> None:
    """The order.received outbox rows of new orders and their first timeline entries, in the
    caller's transaction: one multi-row INSERT per table, however many orders."""
    if not events:
        return
    connection = await session.connection()
    source = f"/fulfil/{settings.service_name}"
    encoded = [encode(event, source=source) for event in events]
    # What fulfil.outbox.stage_events stages, in one statement: the ORM would insert outbox
    # rows one statement each on SQLite (to learn each row's id), 1,000 for a full batch.
    created_at = datetime.now(UTC)
    await connection.execute(
        insert(OutboxRow),
        [
            {
                "event_id": ce_id,
                "topic": settings.kafka_topic,
                "key": record.key,
                "value": record.value,
                "headers": pack_headers(record.headers),
                "created_at": created_at,
                "sent_at": None,
            }
            for ce_id, record in encoded
        ],
    )
    # Our own event is in the timeline at once, and recorded as applied by our consumer group,
    # so that when it comes back from the topic the consumer skips it without a lookup.
    await connection.execute(
        insert(TimelineEntry),
        [
            {
                "ce_id": ce_id,
                "order_id": event.order_id,
                "type": event.type,
                "occurred_at": event.occurred_at,
                "summary": domain.summarize(event),
                "data": order,
            }
            for event, order, (ce_id, _) in zip(events, data, encoded, strict=True)
        ],
    )
    await connection.execute(
        insert(AppliedEvent),
        [{"consumer_group": settings.group_id, "ce_id": ce_id, "applied_at": created_at} for ce_id, _ in encoded],
    )


def wake_relay(session: AsyncSession) -> None:
    """After a commit that staged outbox rows: publish them now, not at the relay's next poll."""
    wake: Callable[[], None] | None = session.info.get(WAKE_RELAY)
    if wake is not None:
        wake()


async def taken_external_refs(session: AsyncSession, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(client id, external_ref) -> order id, for those of ``wanted`` that name an order already."""
    refs_by_client: dict[str, set[str]] = {}
    for client_id, external_ref in wanted:
        refs_by_client.setdefault(client_id, set()).add(external_ref)
    taken: dict[tuple[str, str], str] = {}
    for client_id, refs in refs_by_client.items():
        ordered = sorted(refs)
        for start in range(0, len(ordered), 500):
            statement = select(Order.external_ref, Order.order_id).where(
                Order.client_id == client_id, col(Order.external_ref).in_(ordered[start : start + 500])
            )
            taken.update({(client_id, ref): order_id for ref, order_id in (await session.exec(statement)).all()})
    return taken


# -- idempotency keys (IETF draft-ietf-httpapi-idempotency-key-header) ------------------


@dataclass(frozen=True)
class IdempotencyKey:
    client_id: str
    key: str
    fingerprint: str
    """Of the request body: the same key with another body is refused."""


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(client_id: str, header: str, raw_body: bytes) -> IdempotencyKey:
    """The client's key from the Idempotency-Key header. The draft makes the header a
    structured-field string ("..."), while most clients send it bare: both name one key."""
    value = header
    if len(header) >= 2 and header[0] == header[-1] == '"':
        value = re.sub(r'\\(["\\])', r"\1", header[1:-1])
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationProblem(
            "1 invalid field(s)",
            errors=[
                {
                    "pointer": "/idempotency-key",
                    "location": "header",
                    "detail": f"the key has 1 to {MAX_IDEMPOTENCY_KEY} characters",
                    "code": "string_too_long" if value else "string_too_short",
                }
            ],
        )
    return IdempotencyKey(client_id, value, request_fingerprint(raw_body))


def request_fingerprint(raw_body: bytes) -> str:
    """The same JSON document, however formatted, has the same fingerprint."""
    try:
        canonical = json.dumps(json.loads(raw_body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = raw_body
    return hashlib.sha256(canonical).hexdigest()


REPLAYED_HEADERS = ("Retry-After",)
"""Headers of a refusal that its replay repeats (Location has a column of its own)."""


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    media_type: str
    body: Any
    location: str | None
    headers: dict[str, str]


def key_reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused("this Idempotency-Key was already used with a different request body; use a new key")


def key_in_flight() -> Conflict:
    return Conflict(
        "a request with this Idempotency-Key is still being processed; retry later", headers={"Retry-After": "1"}
    )


def replay_of(record: IdempotencyRecord, fingerprint: str) -> StoredResponse | Problem:
    """What a request with a key seen before gets: the stored response, or a refusal."""
    if record.request_hash != fingerprint:
        return key_reused()
    if record.status_code is None:
        return key_in_flight()  # a claim stored by an earlier version; purged with the other old keys
    return StoredResponse(
        record.status_code,
        record.media_type or "application/json",
        json.loads(record.response_body or "null"),
        record.location,
        dict(record.headers or {}),
    )


def idempotency_record(
    key: IdempotencyKey, outcome: OrderAccepted | Problem, instance: str, now: datetime
) -> dict[str, Any]:
    """The key with the response to replay for it, to be committed with the order it answers for."""
    record: dict[str, Any] = {
        "client_id": key.client_id,
        "key": key.key,
        "request_hash": key.fingerprint,
        "claimed_at": now,
        "location": None,
        "headers": None,
    }
    if isinstance(outcome, Problem):
        replayed = {name: value for name, value in outcome.headers.items() if name in REPLAYED_HEADERS}
        record.update(
            status_code=outcome.status,
            media_type=PROBLEM_JSON,
            response_body=json.dumps(problem_body(outcome, instance)),
            headers=replayed or None,
        )
    else:
        record.update(
            status_code=201,
            media_type="application/json",
            response_body=outcome.model_dump_json(),
            location=outcome.links.self,
        )
    return record


async def stage_idempotency_records(session: AsyncSession, records: Sequence[dict[str, Any]]) -> None:
    if records:
        connection = await session.connection()
        await connection.execute(insert(IdempotencyRecord), list(records))


async def recorded_keys(
    session: AsyncSession, keys: Sequence[IdempotencyKey]
) -> dict[tuple[str, str], IdempotencyRecord]:
    """The stored records of those of ``keys`` that were used before, by (client id, key)."""
    found: dict[tuple[str, str], IdempotencyRecord] = {}
    wanted = sorted({(key.client_id, key.key) for key in keys})
    for start in range(0, len(wanted), 500):
        statement = select(IdempotencyRecord).where(
            tuple_(col(IdempotencyRecord.client_id), col(IdempotencyRecord.key)).in_(wanted[start : start + 500])
        )
        found.update({(r.client_id, r.key): r for r in (await session.exec(statement)).all()})
    return found


async def forget_idempotency_keys(sessions: SessionFactory, used_before: datetime, *, chunk: int = 2000) -> int:
    """Delete the keys first used before ``used_before``; a few thousand per transaction, so that
    a large purge never holds SQLite's write lock for long. Returns how many were deleted."""
    deleted = 0
    while True:
        async with sessions() as session, session.begin():
            expired = (
                await session.exec(
                    select(IdempotencyRecord.client_id, IdempotencyRecord.key)
                    .where(col(IdempotencyRecord.claimed_at) < used_before)
                    .limit(chunk)
                )
            ).all()
            if expired:
                await session.exec(
                    delete(IdempotencyRecord).where(
                        tuple_(col(IdempotencyRecord.client_id), col(IdempotencyRecord.key)).in_(
                            [(client_id, key) for client_id, key in expired]
                        )
                    )
                )
        deleted += len(expired)
        if len(expired) < chunk:
            return deleted


# -- the timeline read model -------------------------------------------------------------


async def apply_event(session: AsyncSession, event: OrderEvent, ce_id: str) -> bool:
    """Add one event to its order's timeline and re-derive the status; False if already there."""
    if await session.get(TimelineEntry, ce_id) is not None:
        return False
    session.add(_timeline_row(event, ce_id))
    await session.flush()
    entries = (await session.exec(select(TimelineEntry).where(TimelineEntry.order_id == event.order_id))).all()
    events = [parse_event(entry.data) for entry in entries]
    order = await session.get(Order, event.order_id)
    if order is not None:
        state = domain.derive_state(events)
        order.status = state.status
        order.delayed = state.delayed
        delay = state.latest_delay
        order.latest_delay = (
            DelayOut(
                occurred_at=delay.occurred_at,
                stage=delay.stage,
                reason=delay.reason,
                new_estimate=delay.new_estimate,
                shipment_id=delay.shipment_id,
            ).model_dump(mode="json")
            if delay is not None
            else None
        )
        order.updated_at = max(as_utc(entry.occurred_at) for entry in entries)
        session.add(order)
    return True


async def timeline(session: AsyncSession, order_id: str) -> list[TimelineEntryOut]:
    entries = (await session.exec(select(TimelineEntry).where(TimelineEntry.order_id == order_id))).all()
    parsed = sorted(
        ((parse_event(entry.data), entry) for entry in entries),
        key=lambda pair: (*domain.timeline_order(pair[0]), pair[1].ce_id),
    )
    return [
        TimelineEntryOut(type=event.type, occurred_at=event.occurred_at, summary=entry.summary, details=entry.data)
        for event, entry in parsed
    ]


# -- reading and cancelling ------------------------------------------------------------------


async def own_order(session: AsyncSession, client: ApiClient, order_id: str) -> Order:
    """The client's order; another client's order is indistinguishable from a missing one."""
    order = await session.get(Order, order_id)
    if order is None or order.client_id != client.id:
        raise NotFound(f"no order {order_id}")
    return order


def summary(order: Order) -> OrderSummary:
    return OrderSummary(
        order_id=order.order_id,
        external_ref=order.external_ref,
        customer_id=order.customer_id,
        status=OrderStatus(order.status),
        delayed=order.delayed,
        received_at=as_utc(order.received_at),
        updated_at=as_utc(order.updated_at),
        links=links(order.order_id),
    )


async def order_detail(session: AsyncSession, client: ApiClient, order_id: str) -> OrderDetail:
    order = await own_order(session, client, order_id)
    return OrderDetail(
        **summary(order).model_dump(),
        latest_delay=DelayOut.model_validate(order.latest_delay) if order.latest_delay else None,
        order=order.order,
        timeline=await timeline(session, order_id),
    )


async def cancel_order(
    session: AsyncSession, settings: ServiceSettings, client: ApiClient, order_id: str, reason: str, now: datetime
) -> CancelAccepted:
    order = await own_order(session, client, order_id)
    if OrderStatus(order.status) in domain.SHIPPED_STATUSES:
        raise Conflict(
            f"order {order_id} has shipped completely ({order.status}); it can no longer be cancelled",
            order_id=order_id,
            status_now=order.status,
        )
    # Conditional update: of two concurrent cancels only one stages order.cancelled.
    result = await session.exec(
        update(Order)
        .where(col(Order.order_id) == order_id, col(Order.cancel_requested_at).is_(None))
        .values(cancel_requested_at=now)
    )
    if result.rowcount == 1:
        event = OrderCancelled(order_id=order_id, occurred_at=now, reason=reason)
        [ce_id] = stage_events(session, settings, [event])
        await apply_event(session, event, ce_id)
    await session.commit()
    await session.refresh(order)
    return CancelAccepted(order_id=order_id, status=OrderStatus(order.status), links=links(order_id))


def encode_cursor(order: Order) -> str:
    raw = json.dumps([as_utc(order.received_at).isoformat(), order.order_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        received_at, order_id = json.loads(raw)
        if not isinstance(order_id, str) or "\x00" in order_id:
            raise ValueError("not an order id")
        return as_utc(datetime.fromisoformat(received_at)), order_id
    except (ValueError, TypeError) as exc:
        raise Problem("the cursor is not one this API returned", title="Invalid cursor") from exc


async def list_orders(
    session: AsyncSession,
    client: ApiClient,
    *,
    external_ref: str | None,
    customer_id: str | None,
    status: OrderStatus | None,
    since: datetime | None,
    cursor: str | None,
    limit: int,
) -> OrderPage:
    """The client's orders by time received (oldest first), filtered, one page at a time."""
    statement = select(Order).where(Order.client_id == client.id)
    if external_ref is not None:
        statement = statement.where(Order.external_ref == external_ref)
    if customer_id is not None:
        statement = statement.where(Order.customer_id == customer_id)
    if status is not None:
        statement = statement.where(Order.status == status.value)
    if since is not None:
        statement = statement.where(col(Order.received_at) >= since.astimezone(UTC))
    if cursor is not None:
        after_at, after_id = decode_cursor(cursor)
        statement = statement.where(
            (col(Order.received_at) > after_at)
            | ((col(Order.received_at) == after_at) & (col(Order.order_id) > after_id))
        )
    statement = statement.order_by(col(Order.received_at), col(Order.order_id)).limit(limit + 1)
    orders = list((await session.exec(statement)).all())
    page, more = orders[:limit], len(orders) > limit
    return OrderPage(items=[summary(order) for order in page], next_cursor=encode_cursor(page[-1]) if more else None)
