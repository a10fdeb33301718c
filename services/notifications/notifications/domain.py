"""Pure rules of customer notification: who hears about what, when to try again, which
addresses a webhook may reach. No I/O here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fulfil.events import ServiceLevel


class NoticeType(StrEnum):
    """What a customer can be told; the order-event types plus our own endpoint notice."""

    RECEIVED = "order.received"
    BACKORDERED = "order.backordered"
    SHIPPED = "order.shipped"
    DELAYED = "order.delayed"
    DELIVERED = "order.delivered"
    CANCELLED = "order.cancelled"
    ENDPOINT_DISABLED = "webhook.endpoint_disabled"


CUSTOMER_CHOICES: tuple[NoticeType, ...] = tuple(n for n in NoticeType if n is not NoticeType.ENDPOINT_DISABLED)
"""The notices a customer may opt in or out of; all of them by default."""


class Channel(StrEnum):
    EMAIL = "email"
    WEBHOOK = "webhook"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class EndpointStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REMOVED = "removed"


RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=24),
    timedelta(hours=30),
)
"""Delay before attempt n+1 after attempt n failed (attempt 1 is immediate): the last
attempt comes about three days (71.6 h) after the first."""
MAX_ATTEMPTS = len(RETRY_SCHEDULE)
JITTER = 0.1
"""Each delay is stretched or shrunk by up to this fraction, so retries do not stampede."""


def retry_delay(attempts_made: int, jitter: float = 0.0) -> timedelta | None:
    """How long to wait after ``attempts_made`` failed attempts; None when they are used up.

    ``jitter`` in [-1, 1] scales the ±JITTER spread (a caller draws it at random)."""
    if attempts_made >= MAX_ATTEMPTS:
        return None
    base = RETRY_SCHEDULE[attempts_made]
    return base * (1 + JITTER * max(-1.0, min(1.0, jitter)))


class OutcomeKind(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"
    DISABLE_ENDPOINT = "disable_endpoint"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    error: str | None = None
    retry_after: timedelta | None = None
    """The receiver asked us to wait this long (Retry-After)."""


RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})


def classify_response(status_code: int, retry_after: str | None, now: datetime) -> Outcome:
    """Only 2xx is success; 410 means "gone for good"; other 4xx will not improve by retrying."""
    if 200 <= status_code < 300:
        return Outcome(OutcomeKind.DELIVERED)
    error = f"HTTP {status_code}"
    if status_code == 410:
        return Outcome(OutcomeKind.DISABLE_ENDPOINT, error + ": endpoint gone, disabled")
    if status_code in RETRY_AFTER_STATUSES:
        return Outcome(OutcomeKind.RETRY, error, parse_retry_after(retry_after, now))
    if 300 <= status_code < 400:
        return Outcome(OutcomeKind.GIVE_UP, error + ": redirects are not followed")
    if 400 <= status_code < 500:
        return Outcome(OutcomeKind.GIVE_UP, error)
    return Outcome(OutcomeKind.RETRY, error)


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(timedelta(0), when - now)


def retry_span(jitter: float = 0.0) -> timedelta:
    """From the first attempt of a delivery to its last, when every one fails (no Retry-After)."""
    delays = (retry_delay(n, jitter) for n in range(1, MAX_ATTEMPTS))
    return sum((d for d in delays if d is not None), timedelta())


def next_attempt_at(
    now: datetime, attempts_made: int, *, jitter: float, retry_after: timedelta | None, retry_after_cap: timedelta
) -> datetime | None:
    """When to try again after a retryable failure, or None when the schedule is used up.

    A receiver's Retry-After wins over our own schedule, within a cap."""
    delay = retry_delay(attempts_made, jitter)
    if delay is None:
        return None
    if retry_after is not None:
        delay = min(retry_after, retry_after_cap)
    return now + delay


def endpoint_should_be_disabled(failing_since: datetime | None, now: datetime, threshold: timedelta) -> bool:
    """An endpoint that has failed every attempt for ``threshold`` is switched off."""
    return failing_since is not None and now - failing_since >= threshold


@dataclass(frozen=True)
class QuietHours:
    """Local hours in which delay notices wait (e.g. 22:00-07:00 Asia/Shanghai)."""

    start: time
    end: time
    timezone: str = "UTC"

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def release_at(
    notice: NoticeType, occurred_at: datetime, quiet_hours: QuietHours | None, service_level: ServiceLevel | None
) -> datetime:
    """When a notice may first be sent: at once, except a delay notice that falls in the
    customer's quiet hours waits until they end (express orders are told at once)."""
    if quiet_hours is None or notice is not NoticeType.DELAYED or service_level is ServiceLevel.EXPRESS:
        return occurred_at
    zone = quiet_hours.zone()
    local = occurred_at.astimezone(zone)
    start, end = quiet_hours.start, quiet_hours.end
    clock = local.time().replace(tzinfo=None)
    if start == end:
        return occurred_at
    if start < end:
        inside = start <= clock < end
        end_day: date = local.date()
    else:  # the window spans midnight
        inside = clock >= start or clock < end
        end_day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not inside:
        return occurred_at
    return datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)


# -- where a webhook may go (SSRF) ------------------------------------------------------


def address_refusal(address: str, *, allow_loopback: bool) -> str | None:
    """Why a webhook may not connect to this IP address, or None when it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped is not None or ip.sixtofour is not None):
        return f"{ip} embeds an IPv4 address"
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is link-local (cloud metadata lives there)"
    if ip.is_private:
        return f"{ip} is a private address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or not ip.is_global:
        return f"{ip} is not a public address"
    return None


def webhook_url_problem(url: str, *, allow_loopback: bool) -> str | None:
    """Why a webhook URL is refused at registration, or None. Hostnames are checked
    again at connect time, since DNS can change after registration."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    del port
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if parts.username or parts.password:
        return "credentials in a webhook URL are not accepted"
    if parts.scheme == "http":
        if not allow_loopback:
            return "webhook URLs must use https"
        if not is_loopback_host(host):
            return "plain http is allowed only to a loopback receiver in dev and test"
    elif parts.scheme != "https":
        return "webhook URLs must use https"
    if is_ip_literal(host):
        return address_refusal(host, allow_loopback=allow_loopback)
    return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    return is_ip_literal(host) and ipaddress.ip_address(host).is_loopback
