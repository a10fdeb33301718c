"""The delivery worker: claims due deliveries, sends them, records every attempt.

Deliveries flow independently: the worker claims only as many rows as it has free
slots, and each claimed row starts its attempt at once, so a slow receiver holds one
slot and never the deliveries behind it. A claim is a lease that starts as the attempt
starts and outlasts the attempt's deadline: a worker that dies between sending and
recording leaves the row ``sending`` until its lease runs out, then it is sent again
with the same delivery id (webhook-id / Message-ID), so a crash costs at most one
duplicate a receiver can drop.

One loop does all of the worker's writing: each turn records the attempts that have
finished and claims rows for the slots they freed, in one transaction. SQLite has one
writer at a time, and writers that queue for it sleep; one transaction per turn, not
two per delivery, keeps the worker from queueing behind itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from fulfil.db import SessionFactory
from sqlalchemy import and_, or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from notifications import service
from notifications.config import Settings
from notifications.domain import (
    Channel,
    DeliveryStatus,
    EndpointStatus,
    Outcome,
    OutcomeKind,
    classify_response,
    endpoint_should_be_disabled,
    next_attempt_at,
)
from notifications.email import EmailSender, PermanentEmailFailure, build_message
from notifications.models import Delivery, DeliveryAttempt, WebhookEndpoint
from notifications.webhooks import AddressRefused, signed_headers

log = logging.getLogger(__name__)

Jitter = Callable[[], float]
SHUTDOWN_GRACE_SECONDS = 5.0
"""On shutdown, attempts in flight get this long to finish and be recorded."""


def random_jitter() -> float:
    return random.uniform(-1.0, 1.0)


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    status_code: int | None = None


@dataclass(frozen=True)
class Finished:
    """An attempt that has been made and waits to be recorded."""

    delivery: Delivery
    endpoint: WebhookEndpoint | None
    result: AttemptResult
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker holds the lease on, with its webhook endpoint as of the claim."""

    delivery: Delivery
    endpoint: WebhookEndpoint | None


class DeliveryWorker:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        *,
        clock: service.Clock,
        http: httpx.AsyncClient,
        email: EmailSender,
        jitter: Jitter = random_jitter,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.http = http
        self.email = email
        self.jitter = jitter
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._finished: list[Finished] = []
        """Attempts made and not yet recorded (the next turn records them)."""

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Forever: record what finished and fill the free slots with due deliveries; sleep
        until an attempt finishes, a delivery is queued, or a poll interval passes."""
        failures = 0
        try:
            while True:
                self._wake.clear()  # before the turn: a wake-up during it is not lost
                finished, self._finished = self._finished, []
                wanted = min(
                    self.settings.delivery_concurrency - len(self._in_flight), self.settings.delivery_batch_size
                )
                try:
                    claimed = await self._turn(finished, wanted)
                except Exception:
                    self._finished = finished + self._finished  # recorded next turn; the leases hold meanwhile
                    failures += 1
                    log.exception("delivery worker turn failed; retrying")
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                    continue
                failures = 0
                for item in claimed:
                    self._start(item)
                if not self._finished and (wanted == 0 or len(claimed) < wanted):
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.settings.delivery_poll_seconds)
                    except TimeoutError:
                        pass
        finally:
            await self._drain()

    async def _turn(self, finished: list[Finished], wanted: int) -> list[Claimed]:
        if not finished and wanted <= 0:
            return []
        async with self.sessions() as session, session.begin():
            if finished:
                await self._record_in(session, finished)
            return await self._claim_in(session, wanted) if wanted > 0 else []

    def _start(self, item: Claimed) -> None:
        task = asyncio.create_task(self._attempt_in_slot(item), name=f"delivery-{item.delivery.id}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _attempt_in_slot(self, item: Claimed) -> None:
        try:
            finished = await self.attempt(item)
            self._finished.append(finished)  # not bound before the await: the list is swapped each turn
        except Exception:  # not recorded: the lease brings the row back
            log.exception("delivery %s: attempt failed unexpectedly", item.delivery.id)
        finally:
            self._wake.set()

    async def _drain(self) -> None:
        """Let attempts in flight finish and record them; cancel what is still sending after
        the grace period (its lease brings it back, with the same webhook-id)."""
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=SHUTDOWN_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._finished:
            finished, self._finished = self._finished, []
            with contextlib.suppress(Exception):
                await self._turn(finished, 0)

    async def run_once(self) -> int:
        """Claim what is due now (up to the free slots), attempt each concurrently, record
        them; returns how many were attempted. For tests and tools: ``run`` is the service loop."""
        wanted = min(self.settings.delivery_concurrency, self.settings.delivery_batch_size)
        claimed = await self._turn([], wanted)
        if claimed:
            finished = await asyncio.gather(*(self.attempt(item) for item in claimed))
            await self._turn(list(finished), 0)
        return len(claimed)

    async def _claim_in(self, session: AsyncSession, limit: int) -> list[Claimed]:
        now = self.clock()
        token = str(uuid.uuid4())
        due = or_(
            and_(col(Delivery.status) == DeliveryStatus.PENDING, col(Delivery.next_attempt_at) <= now),
            and_(col(Delivery.status) == DeliveryStatus.SENDING, col(Delivery.lease_until) <= now),
        )
        ids = list(
            (
                await session.exec(select(Delivery.id).where(due).order_by(col(Delivery.next_attempt_at)).limit(limit))
            ).all()
        )
        if not ids:
            return []
        connection = await session.connection()
        # Conditional on still being due: two workers never both claim a row.
        await connection.execute(
            update(Delivery)
            .where(col(Delivery.id).in_(ids))
            .where(due)
            .values(
                status=DeliveryStatus.SENDING,
                claim=token,
                lease_until=now + timedelta(seconds=self.settings.delivery_lease_seconds),
            )
        )
        mine = select(Delivery).where(col(Delivery.id).in_(ids), col(Delivery.claim) == token)
        deliveries = list((await session.exec(mine.execution_options(populate_existing=True))).all())
        customers = {d.customer_id for d in deliveries if d.channel == Channel.WEBHOOK}
        endpoints: dict[str, WebhookEndpoint] = {}
        if customers:
            rows = await session.exec(select(WebhookEndpoint).where(col(WebhookEndpoint.customer_id).in_(customers)))
            endpoints = {e.customer_id: e for e in rows.all()}
        return [Claimed(d, endpoints.get(d.customer_id) if d.channel == Channel.WEBHOOK else None) for d in deliveries]

    async def attempt(self, item: Claimed) -> Finished:
        """Send once; the result is recorded by the caller."""
        delivery, endpoint = item.delivery, item.endpoint
        started = self.clock()
        if delivery.channel == Channel.WEBHOOK:
            if endpoint is None or endpoint.status != EndpointStatus.ACTIVE:
                result = AttemptResult(Outcome(OutcomeKind.GIVE_UP, "the webhook endpoint is no longer active"))
                endpoint = None
            else:
                result = await self._send_webhook(delivery, endpoint, started)
        else:
            result = await self._send_email(delivery)
        return Finished(delivery, endpoint, result, started, self.clock())

    async def _send_webhook(self, delivery: Delivery, endpoint: WebhookEndpoint, now: datetime) -> AttemptResult:
        headers = signed_headers(endpoint.secret, delivery.id, now, delivery.payload)
        deadline = self.settings.webhook_timeout_seconds
        try:
            # One deadline for the whole attempt: httpx's own timeout applies per phase
            # (connect, each read), so a receiver trickling bytes could hold it for ever.
            async with asyncio.timeout(deadline):
                response = await self.http.post(endpoint.url, content=delivery.payload.encode(), headers=headers)
        except AddressRefused as exc:
            return AttemptResult(Outcome(OutcomeKind.GIVE_UP, f"refused: {exc}"))
        except (TimeoutError, httpx.TimeoutException):
            return AttemptResult(Outcome(OutcomeKind.RETRY, f"timed out after {deadline:g} s"))
        except Exception as exc:  # connect errors, DNS, resets, protocol errors: worth another try
            return AttemptResult(Outcome(OutcomeKind.RETRY, f"{type(exc).__name__}: {exc}"))
        outcome = classify_response(response.status_code, response.headers.get("retry-after"), self.clock())
        return AttemptResult(outcome, response.status_code)

    async def _send_email(self, delivery: Delivery) -> AttemptResult:
        message = build_message(
            sender=self.settings.mail_from,
            recipient=delivery.recipient,
            subject=delivery.subject,
            text=delivery.text_body,
            html=delivery.html_body,
            message_id=delivery.id,
        )
        deadline = self.settings.smtp_timeout_seconds
        try:
            async with asyncio.timeout(deadline):
                await self.email.send(message)
        except PermanentEmailFailure as exc:
            return AttemptResult(Outcome(OutcomeKind.GIVE_UP, str(exc)))
        except TimeoutError:
            return AttemptResult(Outcome(OutcomeKind.RETRY, f"timed out after {deadline:g} s"))
        except Exception as exc:  # a mail server down or slow is worth another try
            return AttemptResult(Outcome(OutcomeKind.RETRY, f"{type(exc).__name__}: {exc}"))
        return AttemptResult(Outcome(OutcomeKind.DELIVERED))

    async def _record_in(self, session: AsyncSession, batch: list[Finished]) -> None:
        ids = [f.delivery.id for f in batch]
        query = select(Delivery).where(col(Delivery.id).in_(ids)).execution_options(populate_existing=True)
        rows = {d.id: d for d in (await session.exec(query)).all()}
        customers = {f.endpoint.customer_id for f in batch if f.endpoint is not None}
        if customers:  # loaded once; the session's identity map hands them out below
            await session.exec(select(WebhookEndpoint).where(col(WebhookEndpoint.customer_id).in_(customers)))
        for finished in batch:
            await self._apply_result(session, finished, rows.get(finished.delivery.id))

    async def _apply_result(self, session: AsyncSession, finished: Finished, row: Delivery | None) -> None:
        delivery, outcome, now = finished.delivery, finished.result.outcome, finished.finished_at
        attempts_made = delivery.attempts_made + 1
        session.add(
            DeliveryAttempt(
                delivery_id=delivery.id,
                number=attempts_made,
                started_at=finished.started_at,
                finished_at=now,
                status_code=finished.result.status_code,
                outcome=outcome.kind,
                error=outcome.error,
            )
        )
        if row is None or row.claim != delivery.claim:
            return  # our lease ran out and another worker owns the row now
        row.attempts_made = attempts_made
        row.claim = None
        row.lease_until = None
        row.last_error = outcome.error
        if outcome.kind is OutcomeKind.DELIVERED:
            row.status = DeliveryStatus.DELIVERED
            row.delivered_at = now
        elif outcome.kind is OutcomeKind.RETRY:
            retry_at = next_attempt_at(
                now,
                attempts_made,
                jitter=self.jitter(),
                retry_after=outcome.retry_after,
                retry_after_cap=timedelta(seconds=self.settings.retry_after_cap_seconds),
            )
            if retry_at is None:
                row.status = DeliveryStatus.FAILED
                row.last_error = f"{outcome.error}; gave up after {attempts_made} attempts"
            else:
                row.status = DeliveryStatus.PENDING
                row.next_attempt_at = retry_at
        else:
            row.status = DeliveryStatus.FAILED
        endpoint = finished.endpoint
        disabled = endpoint is not None and await self._update_endpoint(session, endpoint.customer_id, outcome, now)
        if disabled and row.status == DeliveryStatus.PENDING:
            row.status = DeliveryStatus.FAILED
            row.last_error = f"{outcome.error}; endpoint disabled"
        if outcome.kind is OutcomeKind.DISABLE_ENDPOINT or row.status == DeliveryStatus.FAILED:
            log.warning("delivery %s failed: %s", delivery.id, row.last_error)

    async def _update_endpoint(self, session: AsyncSession, customer_id: str, outcome: Outcome, now: datetime) -> bool:
        """Track how long the endpoint has been failing; True when it was just disabled."""
        endpoint = await session.get(WebhookEndpoint, customer_id)
        if endpoint is None or endpoint.status != EndpointStatus.ACTIVE:
            return False
        if outcome.kind is OutcomeKind.DELIVERED:
            endpoint.failing_since = None
            return False
        if endpoint.failing_since is None:
            endpoint.failing_since = now
        threshold = timedelta(seconds=self.settings.endpoint_disable_after_seconds)
        if outcome.kind is OutcomeKind.DISABLE_ENDPOINT:
            await service.disable_endpoint(session, endpoint, now=now, reason=outcome.error or "gone")
            return True
        if endpoint_should_be_disabled(endpoint.failing_since, now, threshold):
            reason = f"every attempt failed since {endpoint.failing_since.isoformat()}; last: {outcome.error}"
            await service.disable_endpoint(session, endpoint, now=now, reason=reason)
            return True
        return False
