"""Stopping within a bound, even when the work ignores its cancellation."""

from __future__ import annotations

import asyncio
import time

from fulfil.shutdown import finish_within


async def test_work_that_finishes_in_time_is_awaited() -> None:
    done: list[bool] = []

    async def stop() -> None:
        await asyncio.sleep(0.01)
        done.append(True)

    assert await finish_within(stop(), 5)
    assert done == [True]


async def test_work_that_fails_in_time_counts_as_finished() -> None:
    async def stop() -> None:
        raise ConnectionError("broker gone")

    assert await finish_within(stop(), 5)


async def test_work_that_ignores_its_cancellation_is_left_behind_after_the_bound() -> None:
    release = asyncio.Event()

    async def stubborn_stop() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # like a client that insists on finishing its join first

    started = time.monotonic()
    assert not await finish_within(stubborn_stop(), 0.2)
    assert time.monotonic() - started < 2  # asyncio.wait_for would still be waiting here
    release.set()
    await asyncio.sleep(0)
