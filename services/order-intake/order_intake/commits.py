"""Group commit: the orders that concurrent requests accept are committed together.

A commit costs far more than the rows it writes (an fsync, and SQLite has one writer),
so a request does not commit its own order. It hands the order to its process's one
``GroupCommit`` writer and awaits the outcome. The writer takes every order waiting,
stages each with its order.received outbox row, its first timeline entry and its
Idempotency-Key record, and commits once: 201 still means committed. Under light load
a group is a single order, so nobody waits for a group to fill.

The Idempotency-Key record is written with the order it answers for, never before it:
a request that dies half-way (client gone, process killed) leaves both or neither, so
no key stays claimed. Within one process a key still being committed gets 409.

The unique constraints decide, not the lookups. An external_ref that is taken makes its
order a duplicate inside the same INSERT (ON CONFLICT DO NOTHING), whoever took it and
whenever. When a key's unique constraint refuses a group (another replica used the key
meanwhile), the group is committed again one order per transaction, where the loser of
the race sees the winner's row: one conflict never fails the others. The batch endpoint
commits its orders through the same writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fulfil.consumer import is_transient
from fulfil.db import SessionFactory
from fulfil.events import OrderReceived
from fulfil.problems import Problem, json_pointer
from fulfil.settings import ServiceSettings
from prometheus_client import Histogram
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from order_intake import service
from order_intake.models import ApiClient, BatchItemResult, BatchResult, ItemError, OrderAccepted, OrderCreate
from order_intake.service import DuplicateOrder, IdempotencyKey, ServiceUnavailable, StoredResponse

log = logging.getLogger(__name__)

Outcome = OrderAccepted | StoredResponse | Problem
"""Created; replayed (the Idempotency-Key was used before); or refused."""

MAX_GROUP = 500
"""Orders per transaction: enough to amortise the commit, short enough to keep SQLite's lock brief."""

GROUP_SIZE = Histogram(
    "fulfil_order_intake_group_commit_orders",
    "Orders committed together in one group-commit transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
COMMIT_SECONDS = Histogram(
    "fulfil_order_intake_group_commit_seconds",
    "Time one group-commit transaction took, lookups to commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


@dataclass(frozen=True)
class OrderToAccept:
    client: ApiClient
    body: OrderCreate
    now: datetime
    key: IdempotencyKey | None = None
    instance: str = "/v1/orders"
    """The request path, for the body of a refusal stored under the key."""


async def stage_orders(
    session: AsyncSession, settings: ServiceSettings, orders: Sequence[OrderToAccept]
) -> list[Outcome]:
    """Stage the orders in the session's transaction (the caller commits); the outcome of each.

    Idempotency-Keys used before are looked up first, in one query; an external_ref taken
    before is found by the insert itself, which skips that order and fails no other."""
    records = await service.recorded_keys(session, [order.key for order in orders if order.key is not None])
    outcomes: dict[int, Outcome] = {}
    answered: dict[int, OrderAccepted | Problem] = {}
    """The outcomes to store under the order's Idempotency-Key: all but the replays."""
    new: dict[str, list[tuple[int, OrderReceived]]] = {}
    repeats: list[int] = []
    """Orders whose external_ref an earlier order of these orders has: duplicates of whatever it becomes."""
    seen: set[tuple[str, str]] = set()
    for index, order in enumerate(orders):
        ref = (order.client.id, order.body.external_ref)
        if order.key is not None and (record := records.get((order.key.client_id, order.key.key))) is not None:
            outcomes[index] = service.replay_of(record, order.key.fingerprint)
        elif ref in seen:
            repeats.append(index)
        else:
            seen.add(ref)
            new.setdefault(order.client.id, []).append((index, service.new_order(order.client, order.body, order.now)))
    order_of_ref: dict[tuple[str, str], str] = {}
    for indexed in new.values():
        answered.update(await _insert_new(session, settings, orders[indexed[0][0]].client, indexed, order_of_ref))
    for index in repeats:
        external_ref = orders[index].body.external_ref
        answered[index] = service.duplicate_order(external_ref, order_of_ref[(orders[index].client.id, external_ref)])
    key_records = [
        service.idempotency_record(key, outcome, orders[index].instance, orders[index].now)
        for index, outcome in answered.items()
        if (key := orders[index].key) is not None
    ]
    await service.stage_idempotency_records(session, key_records)
    outcomes.update(answered)
    return [outcomes[index] for index in range(len(orders))]


async def _insert_new(
    session: AsyncSession,
    settings: ServiceSettings,
    client: ApiClient,
    indexed: list[tuple[int, OrderReceived]],
    order_of_ref: dict[tuple[str, str], str],
) -> dict[int, OrderAccepted | Problem]:
    """One client's new orders: created, or duplicates of the order that has their external_ref
    (noted in ``order_of_ref`` either way)."""
    events = [event for _, event in indexed]
    data = [event.model_dump(mode="json") for event in events]  # the order row's and the timeline's
    created = await service.insert_new_orders(session, client, events, data)
    fresh = [(event, order) for event, order in zip(events, data, strict=True) if event.order_id in created]
    await service.stage_received(session, settings, [event for event, _ in fresh], [order for _, order in fresh])
    taken = [(client.id, event.external_ref) for event in events if event.order_id not in created]
    order_of_ref.update(await service.taken_external_refs(session, taken) if taken else {})
    answered: dict[int, OrderAccepted | Problem] = {}
    for index, event in indexed:
        ref = (client.id, event.external_ref)
        if event.order_id in created:
            order_of_ref[ref] = event.order_id
            answered[index] = service.accepted(event)
        elif ref in order_of_ref:
            answered[index] = service.duplicate_order(event.external_ref, order_of_ref[ref])
        else:  # taken by a transaction not visible to us: settle this order again on its own
            raise IntegrityError("INSERT INTO intake_orders", None, Exception("external_ref taken, order not visible"))
    return answered


async def commit_orders(
    sessions: SessionFactory, settings: ServiceSettings, orders: Sequence[OrderToAccept]
) -> list[Outcome | BaseException]:
    """Commit the orders in one transaction, or, when a unique constraint refuses that, one by one.

    An order that cannot be committed at all gets its exception as outcome: a database that is
    unreachable becomes 503 (nothing was committed; a retry is safe), anything else stays an error."""
    try:
        return list(await _commit_together(sessions, settings, orders))
    except IntegrityError:
        log.info("%d orders raced another request for a key or external_ref; committing them one by one", len(orders))
    except Exception as exc:
        return [_failure(exc)] * len(orders)
    return [await _commit_alone(sessions, settings, order) for order in orders]


async def _commit_together(
    sessions: SessionFactory, settings: ServiceSettings, orders: Sequence[OrderToAccept]
) -> list[Outcome]:
    async with sessions() as session:
        outcomes = await stage_orders(session, settings, orders)
        await session.commit()
        service.wake_relay(session)
    return outcomes


async def _commit_alone(
    sessions: SessionFactory, settings: ServiceSettings, order: OrderToAccept
) -> Outcome | BaseException:
    try:
        return (await _commit_together(sessions, settings, [order]))[0]
    except IntegrityError:
        pass  # this order lost the race: looked up again, it finds the winner's row and answers with it
    except Exception as exc:
        return _failure(exc)
    try:
        return (await _commit_together(sessions, settings, [order]))[0]
    except Exception as exc:
        return _failure(exc)


def _failure(exc: Exception) -> BaseException:
    if is_transient(exc):
        log.warning("order not committed, the database is unavailable: %r", exc)
        return ServiceUnavailable("the order database is unavailable; retry shortly", headers={"Retry-After": "5"})
    return exc


# -- the writer ---------------------------------------------------------------------------


@dataclass
class _Waiting:
    order: OrderToAccept
    outcome: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """This process's single writer of accepted orders; ``run`` it as a background task."""

    def __init__(self, settings: ServiceSettings, sessions: SessionFactory, *, max_group: int = MAX_GROUP) -> None:
        self.settings = settings
        self.sessions = sessions
        self.max_group = max_group
        self.waiting: asyncio.Queue[_Waiting] = asyncio.Queue()
        self.in_flight: dict[tuple[str, str], str] = {}
        """(client id, key) -> body fingerprint, for every key queued or being committed here."""
        self.stopped = False
        self._writing = asyncio.Lock()
        """Our own transactions queue here, in order, rather than in SQLite's busy handler."""

    async def commit(self, orders: Sequence[OrderToAccept]) -> list[Outcome | BaseException]:
        """Commit orders now, as one group (a batch request does this; single orders are grouped)."""
        async with self._writing:
            with COMMIT_SECONDS.time():
                outcomes = await commit_orders(self.sessions, self.settings, orders)
        GROUP_SIZE.observe(len(orders))
        return outcomes

    async def accept(self, order: OrderToAccept) -> OrderAccepted | StoredResponse:
        """Wait until the order is committed (or refused) with the next group; raise a refusal."""
        if self.stopped:
            raise ServiceUnavailable(
                "order-intake is not accepting orders right now; retry", headers={"Retry-After": "5"}
            )
        if order.key is not None:
            self._hold(order.key)
        waiting = _Waiting(order)
        self.waiting.put_nowait(waiting)
        # Shielded: a request cancelled now (client gone) still has its order and key settled,
        # so its retry gets the stored answer instead of a key stuck in flight.
        outcome = await asyncio.shield(waiting.outcome)
        if isinstance(outcome, Problem):
            raise outcome
        return outcome

    def _hold(self, key: IdempotencyKey) -> None:
        held = self.in_flight.get((key.client_id, key.key))
        if held is None:
            self.in_flight[(key.client_id, key.key)] = key.fingerprint
        elif held != key.fingerprint:
            raise service.key_reused()
        else:
            raise service.key_in_flight()

    async def run(self) -> None:
        """Commit what is waiting, a group at a time, until cancelled."""
        group: list[_Waiting] = []
        try:
            while True:
                group = [await self.waiting.get()]
                while len(group) < self.max_group and not self.waiting.empty():
                    group.append(self.waiting.get_nowait())
                outcomes = await self.commit([waiting.order for waiting in group])
                for waiting, outcome in zip(group, outcomes, strict=True):
                    self._settle(waiting, outcome)
        finally:
            self.stopped = True
            stopping = ServiceUnavailable("order-intake is stopping; retry", headers={"Retry-After": "5"})
            while not self.waiting.empty():
                group.append(self.waiting.get_nowait())
            for waiting in group:
                if not waiting.outcome.done():
                    self._settle(waiting, stopping)

    def _settle(self, waiting: _Waiting, outcome: Outcome | BaseException) -> None:
        if waiting.order.key is not None:
            self.in_flight.pop((waiting.order.key.client_id, waiting.order.key.key), None)
        if isinstance(outcome, BaseException) and not isinstance(outcome, Problem):
            waiting.outcome.set_exception(outcome)
        else:
            waiting.outcome.set_result(outcome)


# -- batches ------------------------------------------------------------------------------


def _item_errors(index: int, exc: ValidationError) -> list[ItemError]:
    return [
        ItemError(pointer=f"/orders/{index}{json_pointer(error['loc'])}", detail=error["msg"], code=error["type"])
        for error in exc.errors()
    ]


async def accept_batch(
    group_commit: GroupCommit, client: ApiClient, raw_orders: Sequence[Any], now: datetime
) -> BatchResult:
    """Accept every valid order of the batch in one transaction; report each item."""
    results: list[BatchItemResult | None] = [None] * len(raw_orders)
    valid: list[tuple[int, OrderToAccept]] = []
    for index, raw in enumerate(raw_orders):
        try:
            body = OrderCreate.model_validate(raw, context={"now": now})
        except ValidationError as exc:
            external_ref = raw.get("external_ref") if isinstance(raw, dict) else None
            results[index] = BatchItemResult(
                index=index,
                result="invalid",
                external_ref=external_ref if isinstance(external_ref, str) else None,
                errors=_item_errors(index, exc),
            )
            continue
        valid.append((index, OrderToAccept(client, body, now)))
    outcomes = await group_commit.commit([order for _, order in valid]) if valid else []
    for (index, order), outcome in zip(valid, outcomes, strict=True):
        if isinstance(outcome, OrderAccepted):
            results[index] = BatchItemResult(
                index=index, result="created", order_id=outcome.order_id, external_ref=outcome.external_ref
            )
        elif isinstance(outcome, DuplicateOrder):
            results[index] = BatchItemResult(
                index=index,
                result="duplicate",
                order_id=outcome.extensions["order_id"],
                external_ref=order.body.external_ref,
            )
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            raise AssertionError(f"unexpected outcome for a batch item: {outcome!r}")
    items = [result for result in results if result is not None]
    return BatchResult(
        created=sum(item.result == "created" for item in items),
        duplicates=sum(item.result == "duplicate" for item in items),
        invalid=sum(item.result == "invalid" for item in items),
        items=items,
    )
