"""Use cases: copy what orders say about customers, queue notices, manage preferences
and the delivery log. Each takes the session of the caller's transaction."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from fulfil.codec import Envelope
from fulfil.events import Locale, OrderEvent, OrderReceived, ServiceLevel
from fulfil.problems import Conflict, NotFound, Problem
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from notifications import notices
from notifications.domain import (
    CUSTOMER_CHOICES,
    Channel,
    DeliveryStatus,
    EndpointStatus,
    NoticeType,
    QuietHours,
    release_at,
    valid_timezone,
    webhook_url_problem,
)
from notifications.models import (
    CustomerProfile,
    Delivery,
    DeliveryAttempt,
    OrderCopy,
    Preferences,
    PreferencesIn,
    PreferencesOut,
    QuietHoursIn,
    WebhookEndpoint,
)
from notifications.webhooks import new_signing_secret

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
DELIVERY_NAMESPACE = uuid.UUID("4f1b8a52-6a0e-4d8e-9c39-6d1f0f1c7e21")

WAKE_DELIVERY_WORKER = "wake_delivery_worker"
"""Session ``info`` key: called after a commit that queued deliveries, so they go out at once."""
_QUEUED = "deliveries_queued"


def delivery_id(ce_id: str, customer_id: str, channel: Channel) -> str:
    """Deterministic, so a handler re-run after a rollback produces the same webhook-id."""
    return str(uuid.uuid5(DELIVERY_NAMESPACE, f"{ce_id}|{customer_id}|{channel}"))


# -- from order events ------------------------------------------------------------------


async def record_order(session: AsyncSession, event: OrderReceived) -> OrderCopy:
    """Copy the order's customer contact, locale and tier, and the order facts notices need."""
    customer = event.customer
    profile = await session.get(CustomerProfile, customer.id)
    if profile is None:
        profile = CustomerProfile(customer_id=customer.id, updated_at=event.occurred_at)
        session.add(profile)
    if event.occurred_at >= profile.updated_at:  # an older order must not overwrite newer contact data
        profile.email = customer.contact.email or profile.email
        profile.locale = customer.locale
        profile.tier = customer.tier
        profile.updated_at = event.occurred_at
    order = await session.get(OrderCopy, event.order_id)
    if order is None:
        order = OrderCopy(
            order_id=event.order_id,
            customer_id=customer.id,
            client=event.client,
            external_ref=event.external_ref,
            service_level=event.service_level,
            locale=customer.locale,
            email=customer.contact.email,
            lines=[line.model_dump(mode="json") for line in event.lines],
            allow_partial=event.allow_partial,
            placed_at=event.placed_at,
        )
        session.add(order)
    return order


async def queue_notices(session: AsyncSession, envelope: Envelope, notice: NoticeType) -> list[str]:
    """One delivery row per channel the customer reaches us on, for this event."""
    event = envelope.data
    order = await session.get(OrderCopy, event.order_id)
    if order is None:
        log.warning("no order.received seen for %s; cannot tell its customer about %s", event.order_id, notice)
        return []
    preferences = await session.get(Preferences, order.customer_id)
    if preferences is not None and notice not in preferences.events:
        return []
    locale = (preferences.locale if preferences else None) or order.locale
    email = await email_of(session, order.customer_id, preferences, fallback=order.email)
    endpoint = await session.get(WebhookEndpoint, order.customer_id)
    facts = notices.OrderFacts(
        order.order_id, order.external_ref, order.client, order.service_level, order.lines, order.allow_partial
    )
    rendered = notices.render(notice, locale, lambda loc: notices.notice_context(event, facts, loc))
    due = release_at(notice, event.occurred_at, quiet_hours_of(preferences), ServiceLevel(order.service_level))
    data = {
        "order_id": event.order_id,
        "external_ref": order.external_ref,
        "customer_id": order.customer_id,
        "event_id": envelope.id,
        "event": event.model_dump(mode="json"),
        "notice": {"locale": rendered.locale, "subject": rendered.subject, "text": rendered.text},
    }
    targets: list[tuple[Channel, str]] = []
    if email:
        targets.append((Channel.EMAIL, email))
    if endpoint is not None and endpoint.status == EndpointStatus.ACTIVE:
        targets.append((Channel.WEBHOOK, endpoint.url))
    return await add_deliveries(
        session,
        ce_id=envelope.id,
        event=event,
        customer_id=order.customer_id,
        notice=notice,
        rendered=rendered,
        payload=notices.webhook_payload(notice, event.occurred_at, data),
        targets=targets,
        due=due,
    )


async def email_of(
    session: AsyncSession, customer_id: str, preferences: Preferences | None, *, fallback: str | None = None
) -> str | None:
    """Where order notices are emailed: the customer's own address, else the one their
    orders give; None when they switched email off."""
    if preferences is not None and not preferences.email_enabled:
        return None
    if preferences is not None and preferences.email:
        return preferences.email
    profile = await session.get(CustomerProfile, customer_id)
    return (profile.email if profile else None) or fallback


async def add_deliveries(
    session: AsyncSession,
    *,
    ce_id: str,
    event: OrderEvent | None,
    customer_id: str,
    notice: NoticeType,
    rendered: notices.RenderedNotice,
    payload: str,
    targets: Sequence[tuple[Channel, str]],
    due: datetime,
    occurred_at: datetime | None = None,
) -> list[str]:
    """Queue one delivery per target; returns the ids of those that were not queued before.

    A delivery already queued for this (event, customer, channel) is left alone: the
    broker may redeliver an event whose applied id the inbox has since forgotten."""
    if not targets:
        return []
    written = datetime.now(UTC)
    rows = [
        {
            "id": delivery_id(ce_id, customer_id, channel),
            "ce_id": ce_id,
            "order_id": event.order_id if event is not None else None,
            "customer_id": customer_id,
            "channel": channel.value,
            "notice": notice.value,
            "locale": rendered.locale,
            "recipient": recipient,
            "subject": rendered.subject,
            "text_body": rendered.text,
            "html_body": rendered.html,
            "payload": payload,
            "status": DeliveryStatus.PENDING.value,
            "attempts_made": 0,
            "next_attempt_at": due,
            "occurred_at": event.occurred_at if event is not None else (occurred_at or due),
            "created_at": written,
        }
        for channel, recipient in targets
    ]
    connection = await session.connection()
    insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    statement = insert(Delivery).on_conflict_do_nothing().returning(col(Delivery.id))
    inserted = [str(row_id) for row_id in (await connection.execute(statement, rows)).scalars()]
    if len(inserted) < len(rows):
        log.info("event %s was queued for %s before; not queued again", ce_id, customer_id)
    if inserted:
        session.sync_session.info[_QUEUED] = True
    return inserted


def install_commit_hook() -> None:
    """Wake the delivery worker as soon as a transaction that queued deliveries commits."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "after_commit", _after_commit):
        event.listen(Session, "after_commit", _after_commit)


def _after_commit(session: object) -> None:
    info = getattr(session, "info", {})
    if info.pop(_QUEUED, False):
        wake: Callable[[], None] | None = info.get(WAKE_DELIVERY_WORKER)
        if wake is not None:
            wake()


install_commit_hook()


def quiet_hours_of(preferences: Preferences | None) -> QuietHours | None:
    if preferences is None or preferences.quiet_start is None or preferences.quiet_end is None:
        return None
    return QuietHours(preferences.quiet_start, preferences.quiet_end, preferences.quiet_timezone or "UTC")


# -- preferences ------------------------------------------------------------------------


class InvalidPreferences(Problem):
    status = 422
    title = "Invalid preferences"
    type = "https://fulfil.dev/problems/invalid-preferences"


async def put_preferences(
    session: AsyncSession, customer_id: str, body: PreferencesIn, *, now: datetime, allow_loopback: bool
) -> PreferencesOut:
    """Store a customer's choices: an absent field stays as it was, an explicit null switches
    a channel off; a new (or changed) webhook URL gets a new signing secret, shown once."""
    given = body.model_fields_set
    if body.webhook_url is not None:
        problem = webhook_url_problem(body.webhook_url, allow_loopback=allow_loopback)
        if problem is not None:
            raise InvalidPreferences(problem, pointer="/webhook_url")
    if body.quiet_hours is not None and not valid_timezone(body.quiet_hours.timezone):
        raise InvalidPreferences(f"unknown time zone {body.quiet_hours.timezone!r}", pointer="/quiet_hours/timezone")
    preferences = await _locked_preferences(session, customer_id, now=now)
    if "locale" in given:
        preferences.locale = body.locale
    if "email" in given:
        preferences.email = body.email
        preferences.email_enabled = body.email is not None
    if "events" in given:
        preferences.events = sorted(set(body.events if body.events is not None else CUSTOMER_CHOICES))
    if "quiet_hours" in given:
        quiet = body.quiet_hours
        preferences.quiet_start = quiet.start if quiet else None
        preferences.quiet_end = quiet.end if quiet else None
        preferences.quiet_timezone = quiet.timezone if quiet else None
    preferences.updated_at = now

    new_secret: str | None = None
    endpoint = await session.get(WebhookEndpoint, customer_id)
    if "webhook_url" not in given:
        pass
    elif body.webhook_url is None:
        if endpoint is not None and endpoint.status != EndpointStatus.REMOVED:
            endpoint.status = EndpointStatus.REMOVED
            await fail_pending_webhooks(session, customer_id, "the customer removed the webhook endpoint")
    elif endpoint is None or endpoint.url != body.webhook_url or endpoint.status == EndpointStatus.REMOVED:
        new_secret = new_signing_secret()
        if endpoint is None:
            endpoint = WebhookEndpoint(customer_id=customer_id, url=body.webhook_url, secret=new_secret, created_at=now)
            session.add(endpoint)
        endpoint.url = body.webhook_url
        endpoint.secret = new_secret
        endpoint.created_at = now
        _reactivate(endpoint)
    elif endpoint.status == EndpointStatus.DISABLED:
        _reactivate(endpoint)  # same URL again: the customer says it is fixed; keep the secret
    await session.flush()
    return preferences_out(preferences, endpoint, secret=new_secret)


async def _locked_preferences(session: AsyncSession, customer_id: str, *, now: datetime) -> Preferences:
    """The customer's preferences row, created with the defaults if new, and locked until
    commit: two concurrent PUTs for one customer take turns instead of colliding."""
    connection = await session.connection()
    insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    defaults = {
        "customer_id": customer_id,
        "locale": None,
        "email": None,
        "email_enabled": True,
        "events": sorted(CUSTOMER_CHOICES),
        "updated_at": now,
    }
    await connection.execute(insert(Preferences).values(**defaults).on_conflict_do_nothing())
    preferences = await session.get(Preferences, customer_id, with_for_update=True, populate_existing=True)
    assert preferences is not None
    return preferences


def _reactivate(endpoint: WebhookEndpoint) -> None:
    endpoint.status = EndpointStatus.ACTIVE
    endpoint.failing_since = None
    endpoint.disabled_at = None
    endpoint.disabled_reason = None


async def get_preferences(session: AsyncSession, customer_id: str) -> PreferencesOut:
    preferences = await session.get(Preferences, customer_id)
    if preferences is None:
        raise NotFound(f"customer {customer_id} has set no notification preferences")
    endpoint = await session.get(WebhookEndpoint, customer_id)
    return preferences_out(preferences, endpoint)


def preferences_out(
    preferences: Preferences, endpoint: WebhookEndpoint | None, *, secret: str | None = None
) -> PreferencesOut:
    live = endpoint is not None and endpoint.status != EndpointStatus.REMOVED
    quiet = None
    if preferences.quiet_start is not None and preferences.quiet_end is not None:
        quiet = QuietHoursIn(
            start=preferences.quiet_start, end=preferences.quiet_end, timezone=preferences.quiet_timezone or "UTC"
        )
    return PreferencesOut(
        customer_id=preferences.customer_id,
        locale=Locale(preferences.locale) if preferences.locale else None,
        email=preferences.email,
        email_enabled=preferences.email_enabled,
        webhook_url=endpoint.url if live and endpoint else None,
        webhook_status=EndpointStatus(endpoint.status) if live and endpoint else None,
        events=[NoticeType(e) for e in preferences.events],
        quiet_hours=quiet,
        webhook_secret=secret,
        updated_at=preferences.updated_at,
    )


# -- webhook endpoints that stop answering --------------------------------------------------


async def fail_pending_webhooks(session: AsyncSession, customer_id: str, reason: str) -> None:
    connection = await session.connection()
    await connection.execute(
        update(Delivery)
        .where(col(Delivery.customer_id) == customer_id)
        .where(col(Delivery.channel) == Channel.WEBHOOK)
        .where(col(Delivery.status) == DeliveryStatus.PENDING)
        .values(status=DeliveryStatus.FAILED, last_error=reason)
    )


async def disable_endpoint(session: AsyncSession, endpoint: WebhookEndpoint, *, now: datetime, reason: str) -> None:
    """Switch the endpoint off, fail what was waiting for it, and tell the customer by email."""
    failing_since = endpoint.failing_since or now
    endpoint.status = EndpointStatus.DISABLED
    endpoint.disabled_at = now
    endpoint.disabled_reason = reason
    await session.flush()  # deliveries just rescheduled in this session must be failed too
    await fail_pending_webhooks(session, endpoint.customer_id, f"endpoint disabled: {reason}")
    preferences = await session.get(Preferences, endpoint.customer_id)
    profile = await session.get(CustomerProfile, endpoint.customer_id)
    # Told even when order notices go by webhook only: otherwise they would hear nothing at all.
    email = (preferences.email if preferences else None) or (profile.email if profile else None)
    if email is None:
        log.warning("webhook endpoint of %s disabled; no email to tell them", endpoint.customer_id)
        return
    locale = (preferences.locale if preferences else None) or (profile.locale if profile else Locale.EN)
    context: dict[str, Any] = {
        "url": endpoint.url,
        "failing_since": failing_since,
        "error": reason,
        "email_notices": preferences is None or preferences.email_enabled,
    }
    rendered = notices.render(NoticeType.ENDPOINT_DISABLED, locale, lambda _loc: context)
    data = {"customer_id": endpoint.customer_id, "url": endpoint.url, "reason": reason}
    await add_deliveries(
        session,
        ce_id=f"endpoint-disabled:{endpoint.customer_id}:{now.isoformat()}",
        event=None,
        customer_id=endpoint.customer_id,
        notice=NoticeType.ENDPOINT_DISABLED,
        rendered=rendered,
        payload=notices.webhook_payload(NoticeType.ENDPOINT_DISABLED, now, data),
        targets=[(Channel.EMAIL, email)],
        due=now,
        occurred_at=now,
    )


# -- the delivery log -----------------------------------------------------------------------


async def list_deliveries(
    session: AsyncSession,
    *,
    order_id: str | None,
    customer_id: str | None,
    status: DeliveryStatus | None,
    limit: int,
) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
    query = select(Delivery).order_by(col(Delivery.occurred_at), col(Delivery.id)).limit(limit)
    if order_id is not None:
        query = query.where(col(Delivery.order_id) == order_id)
    if customer_id is not None:
        query = query.where(col(Delivery.customer_id) == customer_id)
    if status is not None:
        query = query.where(col(Delivery.status) == status)
    deliveries = list((await session.exec(query)).all())
    attempts: dict[str, list[DeliveryAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        rows = await session.exec(
            select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id).in_(list(attempts)))
            .order_by(col(DeliveryAttempt.delivery_id), col(DeliveryAttempt.number), col(DeliveryAttempt.id))
        )
        for attempt in rows.all():
            attempts[attempt.delivery_id].append(attempt)
    return [(d, attempts[d.id]) for d in deliveries]


async def get_delivery(session: AsyncSession, delivery_id: str) -> tuple[Delivery, list[DeliveryAttempt]]:
    delivery = await session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no delivery {delivery_id}")
    rows = await session.exec(
        select(DeliveryAttempt)
        .where(col(DeliveryAttempt.delivery_id) == delivery_id)
        .order_by(col(DeliveryAttempt.number), col(DeliveryAttempt.id))
    )
    return delivery, list(rows.all())


async def retry_delivery(session: AsyncSession, delivery_id: str, *, now: datetime) -> Delivery:
    """Send a failed delivery again, with a fresh round of attempts and the same webhook-id."""
    delivery = await session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no delivery {delivery_id}")
    if delivery.status != DeliveryStatus.FAILED:
        raise Conflict(f"delivery {delivery_id} is {delivery.status}; only a failed delivery can be retried")
    if delivery.channel == Channel.WEBHOOK:
        endpoint = await session.get(WebhookEndpoint, delivery.customer_id)
        if endpoint is None or endpoint.status != EndpointStatus.ACTIVE:
            raise Conflict(
                f"the webhook endpoint of {delivery.customer_id} is not active; "
                "the customer must PUT their preferences with a working webhook_url first"
            )
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts_made = 0
    delivery.next_attempt_at = now
    delivery.lease_until = None
    delivery.claim = None
    return delivery
