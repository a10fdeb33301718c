"""Group commit of accepted orders, Idempotency-Keys stored with their order, and their expiry,
on a real database (SQLite, and PostgreSQL where it answers) and broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from fulfil import db
from fulfil.outbox import OutboxRow
from fulfil.problems import Conflict
from intake_support import Intake, order_body
from order_intake import service
from order_intake.commits import GroupCommit
from order_intake.models import IdempotencyRecord, IntakeTable, Order, TimelineEntry
from order_intake.schema import upgrade
from order_intake.service import IdempotencyKey
from prometheus_client import REGISTRY
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError
from sqlmodel import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

pytestmark = pytest.mark.asyncio(loop_scope="module")


def transactions_so_far() -> float:
    return REGISTRY.get_sample_value("fulfil_order_intake_group_commit_orders_count") or 0.0


async def client_id(intake: Intake) -> str:
    async with intake.runtime.read_sessions() as session:
        client = await service.authenticate(session, intake.key)
        assert client is not None
        return client.id


async def count(intake: Intake, table: Any, *where: Any) -> int:
    async with intake.runtime.read_sessions() as session:
        return int((await session.exec(select(func.count()).select_from(table).where(*where))).one())


async def post_all(intake: Intake, bodies: Sequence[dict[str, Any]], keys: Sequence[str | None] = ()) -> list[Any]:
    keys = list(keys) or [None] * len(bodies)
    return await asyncio.gather(
        *[
            intake.http.post(
                "/v1/orders", json=body, headers={**intake.auth(), **({"Idempotency-Key": k} if k else {})}
            )
            for body, k in zip(bodies, keys, strict=True)
        ]
    )


async def test_concurrent_orders_share_transactions_and_each_201_is_committed(intake_any_db: Intake) -> None:
    intake = intake_any_db
    before = transactions_so_far()
    bodies = [order_body(f"SO-g{i}") for i in range(40)]
    responses = await post_all(intake, bodies, [f"key-{i}" if i % 2 else None for i in range(40)])
    assert [r.status_code for r in responses] == [201] * 40
    assert transactions_so_far() - before < 40  # grouped: fewer commits than orders
    # Each 201 was sent after its commit: a fresh session sees every order, its event and its key.
    order_ids = [r.json()["order_id"] for r in responses]
    assert await count(intake, Order, Order.order_id.in_(order_ids)) == 40  # type: ignore[attr-defined]
    assert await count(intake, TimelineEntry, TimelineEntry.order_id.in_(order_ids)) == 40  # type: ignore[attr-defined]
    assert await count(intake, OutboxRow) == 40
    assert await count(intake, IdempotencyRecord) == 20


async def test_a_conflict_in_a_group_fails_no_other_order_of_it(intake_any_db: Intake) -> None:
    intake = intake_any_db
    existing = (await intake.http.post("/v1/orders", json=order_body("SO-taken"), headers=intake.auth())).json()
    keyed = await intake.http.post(
        "/v1/orders", json=order_body("SO-keyed"), headers={**intake.auth(), "Idempotency-Key": "used"}
    )
    bodies = [order_body(f"SO-c{i}") for i in range(8)] + [order_body("SO-taken"), order_body("SO-keyed")]
    keys = [None] * 9 + ["used"]
    responses = await post_all(intake, bodies, keys)
    assert [r.status_code for r in responses[:8]] == [201] * 8
    assert responses[8].status_code == 409
    assert responses[8].json()["order_id"] == existing["order_id"]
    assert responses[9].status_code == 201
    assert responses[9].headers["idempotent-replayed"] == "true"
    assert responses[9].json() == keyed.json()
    assert await count(intake, Order) == 10


async def test_a_key_taken_by_a_race_is_settled_order_by_order(
    intake_any_db: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unique constraint, not the lookup, decides: when the lookup misses a key that another
    replica committed meanwhile, the group's insert fails, and its orders are committed again one
    by one; only the order with that key gets the other's answer."""
    intake = intake_any_db
    first = await intake.http.post(
        "/v1/orders", json=order_body("SO-r0"), headers={**intake.auth(), "Idempotency-Key": "raced"}
    )
    real_lookup = service.recorded_keys
    blind: list[int] = []

    async def lookup_that_misses_once(session: AsyncSession, keys: Sequence[IdempotencyKey]) -> Any:
        if keys and not blind:
            blind.append(len(keys))
            return {}
        return await real_lookup(session, keys)

    monkeypatch.setattr(service, "recorded_keys", lookup_that_misses_once)
    responses = await post_all(
        intake, [order_body(f"SO-r{i}") for i in range(6)], ["raced", None, None, None, None, None]
    )
    assert blind  # the race happened
    assert [r.status_code for r in responses] == [201] * 6
    assert responses[0].headers["idempotent-replayed"] == "true"
    assert responses[0].json() == first.json()
    assert all("idempotent-replayed" not in r.headers for r in responses[1:])
    assert await count(intake, Order) == 6


async def test_one_external_ref_posted_concurrently_makes_one_order(intake_any_db: Intake) -> None:
    intake = intake_any_db
    responses = await post_all(intake, [order_body("SO-twice")] * 6)
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1
    duplicates = [r for r in responses if r.status_code == 409]
    assert len(duplicates) == 5
    assert {r.json()["order_id"] for r in duplicates} == {created[0].json()["order_id"]}
    assert await count(intake, Order) == 1


async def test_an_unreachable_database_is_503_with_retry_after_and_nothing_written(
    own_intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = own_intake

    async def database_away(*args: Any) -> set[str]:
        raise OperationalError("INSERT INTO intake_orders", {}, Exception("unable to open database file"))

    with monkeypatch.context() as patched:
        patched.setattr(service, "insert_new_orders", database_away)
        headers = {**intake.auth(), "Idempotency-Key": "outage"}
        refused = await intake.http.post("/v1/orders", json=order_body("SO-outage"), headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
    assert await count(intake, Order) == 0
    assert await count(intake, IdempotencyRecord) == 0
    retry = await intake.http.post("/v1/orders", json=order_body("SO-outage"), headers=headers)
    assert retry.status_code == 201  # the same key is free: nothing was stored for it


async def test_orders_arriving_while_the_writer_stops_get_503(own_intake: Intake) -> None:
    intake = own_intake
    group_commit: GroupCommit = intake.runtime.extras["intake"].group_commit
    [writer] = [task for task in intake.runtime.tasks if task.get_name() == "commit_accepted_orders"]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert group_commit.stopped
    response = await intake.http.post("/v1/orders", json=order_body("SO-late"), headers=intake.auth())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "intake_overrides", [{"idempotency_retention_seconds": 3600, "idempotency_purge_interval_seconds": 0.05}]
)
async def test_idempotency_keys_are_forgotten_after_the_retention(own_intake: Intake) -> None:
    intake = own_intake
    headers = {**intake.auth(), "Idempotency-Key": "old"}
    assert (await intake.http.post("/v1/orders", json=order_body("SO-k1"), headers=headers)).status_code == 201
    reused = await intake.http.post("/v1/orders", json=order_body("SO-k2"), headers=headers)
    assert reused.status_code == 422  # within the retention: the key is taken by another body
    intake.clock.advance(3601)
    deadline = asyncio.get_running_loop().time() + 10
    while await count(intake, IdempotencyRecord) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert await count(intake, IdempotencyRecord) == 0
    fresh = await intake.http.post("/v1/orders", json=order_body("SO-k2"), headers=headers)
    assert fresh.status_code == 201
    assert "idempotent-replayed" not in fresh.headers
    # The external_ref still stands guard after the key is gone: no duplicate order.
    again = await intake.http.post("/v1/orders", json=order_body("SO-k1"), headers={**intake.auth()})
    assert again.status_code == 409


async def test_forgetting_keys_goes_a_chunk_at_a_time_and_spares_recent_ones(intake_any_db: Intake) -> None:
    intake = intake_any_db
    bodies = [order_body(f"SO-p{i}") for i in range(7)]
    await post_all(intake, bodies, [f"p-{i}" for i in range(7)])
    intake.clock.advance(10)
    await post_all(intake, [order_body("SO-recent")], ["recent"])
    cutoff = intake.clock() - timedelta(seconds=5)
    assert await service.forget_idempotency_keys(intake.runtime.sessions, cutoff, chunk=3) == 7
    async with intake.runtime.read_sessions() as session:
        assert [r.key for r in (await session.exec(select(IdempotencyRecord))).all()] == ["recent"]


async def test_a_replayed_refusal_keeps_its_retry_after(intake_any_db: Intake) -> None:
    intake = intake_any_db
    body = order_body("SO-wait")
    key = IdempotencyKey(await client_id(intake), "later", service.request_fingerprint(json.dumps(body).encode()))
    refusal = Conflict("the warehouse calendar is closed; retry later", headers={"Retry-After": "30"})
    async with intake.runtime.sessions() as session:
        record = service.idempotency_record(key, refusal, "/v1/orders", intake.clock())
        await service.stage_idempotency_records(session, [record])
        await session.commit()
    replay = await intake.http.post("/v1/orders", json=body, headers={**intake.auth(), "Idempotency-Key": "later"})
    assert replay.status_code == 409
    assert replay.headers["retry-after"] == "30"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["detail"] == refusal.detail


async def test_a_quoted_idempotency_key_is_the_same_key_as_the_bare_one(intake: Intake) -> None:
    """The IETF draft makes the header a structured-field string; most clients send it bare."""
    first = await intake.http.post(
        "/v1/orders", json=order_body("SO-q"), headers={**intake.auth(), "Idempotency-Key": '"q-1"'}
    )
    bare = await intake.http.post(
        "/v1/orders", json=order_body("SO-q"), headers={**intake.auth(), "Idempotency-Key": "q-1"}
    )
    assert first.status_code == bare.status_code == 201
    assert bare.headers["idempotent-replayed"] == "true"
    empty = await intake.http.post(
        "/v1/orders", json=order_body("SO-e"), headers={**intake.auth(), "Idempotency-Key": '""'}
    )
    assert empty.status_code == 422


async def test_a_database_from_before_replay_headers_is_upgraded_at_start(tmp_path: Any) -> None:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/old.db")
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "CREATE TABLE intake_idempotency_keys (client_id VARCHAR(64) NOT NULL, "
                    "key VARCHAR(255) NOT NULL, request_hash VARCHAR(64) NOT NULL, claimed_at DATETIME NOT NULL, "
                    "status_code INTEGER, media_type VARCHAR(100), response_body VARCHAR, location VARCHAR(300), "
                    "PRIMARY KEY (client_id, key))"
                )
            )
            await connection.run_sync(IntakeTable.metadata.create_all)
            await connection.run_sync(upgrade)
            await connection.run_sync(upgrade)  # idempotent

            def columns_and_indexes(sync: Any) -> tuple[set[str], set[str]]:
                inspector = inspect(sync)
                table = "intake_idempotency_keys"
                return (
                    {c["name"] for c in inspector.get_columns(table)},
                    {i["name"] for i in inspector.get_indexes(table)},
                )

            columns, indexes = await connection.run_sync(columns_and_indexes)
        assert "headers" in columns
        assert "ix_intake_idempotency_keys_claimed_at" in indexes
    finally:
        await engine.dispose()
