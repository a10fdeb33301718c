"""Stopping within a bound: a client library stuck on a dead peer must not hold shutdown up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def finish_within(work: Awaitable[object], seconds: float) -> bool:
    """Await ``work`` for at most ``seconds``; cancel it and return False if it is not done.

    ``asyncio.wait``, not ``wait_for``: after its timeout, ``wait_for`` waits for the work
    to honour the cancellation, which a stuck client may never do. The work's own error, if
    it ends with one, is not ours to raise during shutdown."""
    future = asyncio.ensure_future(work)
    _, unfinished = await asyncio.wait([future], timeout=seconds)
    if unfinished:
        future.cancel()
        return False
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never retrieved
    return True
