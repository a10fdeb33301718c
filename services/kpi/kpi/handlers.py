"""Event handlers of the kpi service: every order event is merged into its order's facts.

The platform's consumer calls a handler per event inside one transaction per batch.
Applying events one by one would read and write each order's row once per event; so
the handler only stages the event on the session, and the whole batch is applied when
the transaction commits (``before_commit``): one read of the batch's orders, each order
scored once, one write, and the batch's aggregate changes journalled. Every half second
the same hook also folds the journal into the aggregates, so that on SQLite the fold
never waits for the consumer's write lock nor the consumer for the fold's. Same
transaction, so exactly-once is unchanged.

A failure at commit is not tied to one record, so the platform could neither retry nor
dead-letter the culprit. After such a failure the handlers apply each event in the
handler itself for a while: the platform then isolates the bad record as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from fulfil.codec import Envelope
from fulfil.consumer import Handlers, is_transient
from fulfil.events import CATALOGUE, OrderEvent
from sqlalchemy.event import listen
from sqlalchemy.orm import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from kpi import service
from kpi.service import Clock

log = logging.getLogger(__name__)

STAGED = "kpi.staged_events"
ONE_BY_ONE_SECONDS = 60.0
FOLD_SECONDS = 0.5
"""How often journalled changes are added into the aggregates (so reports lag at most this)."""


class BatchIngest:
    """Applies the events a consumer transaction handled, together, when it commits."""

    def __init__(self, clock: Clock, settle_after: timedelta, *, monotonic: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.settle_after = int(settle_after.total_seconds())
        self.monotonic = monotonic
        self.one_by_one_until = 0.0
        self.folded_at = monotonic()

    async def on_order_event(self, event: OrderEvent, session: AsyncSession, envelope: Envelope) -> None:
        """Record the event's facts for its order; first write wins, so a redelivery changes nothing."""
        if self.monotonic() < self.one_by_one_until:
            await session.run_sync(self.apply, [event])
            return
        staged: list[OrderEvent] | None = session.info.get(STAGED)
        if staged is None:
            staged = session.info[STAGED] = []
            listen(session.sync_session, "before_commit", self._before_commit, once=True)
        staged.append(event)

    def apply(self, session: Session, events: list[OrderEvent]) -> None:
        service.apply_events(session, events, now=self.clock(), settle_after=self.settle_after)
        if self.fold_due():
            service.fold_pending(session)
            self.folded_at = self.monotonic()

    def fold_due(self) -> bool:
        return self.monotonic() - self.folded_at >= FOLD_SECONDS

    def _before_commit(self, session: Session) -> None:
        events: list[OrderEvent] = session.info.pop(STAGED, [])
        try:
            self.apply(session, events)
        except Exception as exc:
            if not is_transient(exc):
                self.one_by_one_until = self.monotonic() + ONE_BY_ONE_SECONDS
                log.error("applying a batch of %d events failed, applying one by one for a while: %r", len(events), exc)
            raise

    def handlers(self) -> Handlers:
        return dict.fromkeys(CATALOGUE.values(), self.on_order_event)
