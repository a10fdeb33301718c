"""The delay scanner: a background task announcing late shipments every few seconds."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from fulfil.service import Runtime
from sqlalchemy.exc import DBAPIError

from shipping import service
from shipping.clock import Clock
from shipping.config import Settings

log = logging.getLogger(__name__)


async def delay_scanner(runtime: Runtime) -> None:
    """Run until cancelled; a failed scan (database down, a replica's race) is retried next tick."""
    settings = cast(Settings, runtime.settings)
    clock = cast(Clock, runtime.extras["clock"])
    while True:
        try:
            announced = await service.scan_for_delays(runtime.sessions, settings, clock.now())
            if announced:
                log.info("announced %d delay(s)", len(announced))
        except DBAPIError as exc:
            log.warning("delay scan failed, retrying next tick: %s", exc)
        except Exception:
            # A bug must not silently end delay detection for the life of the process.
            log.exception("delay scan crashed; retrying next tick")
        await asyncio.sleep(settings.delay_scan_seconds)
