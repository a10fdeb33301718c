"""A simulated warehouse and carrier for demos and load: dispatches pending shipments and
posts signed tracking events through the real HTTP endpoints, with configurable rates of
late dispatch, transit delay, damage and carrier exceptions.

Plans are drawn relative to each shipment's own windows (allocated -> ship_by ->
promised delivery), so "late" here is late as the shipping service sees it. Run the
shipping service with ``TIME_COMPRESSION`` to make those windows minutes instead of days.

Nothing lives only in this process: every plan is drawn from a random stream seeded by
the shipment id, tracking numbers are derived from it too, and parcels in flight are
recovered from shipping's API on start (and every so often), so a restarted simulator
carries on the same journeys and a retried dispatch is the same dispatch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from shipping.clock import Clock
from shipping.domain import CarrierStatus, ExceptionReason
from shipping.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

log = logging.getLogger(__name__)

SIGNERS = ("Li Na", "Wang Fang", "Zhang Wei", "Chen Jing", "Maria Lopez", "John Smith", "front desk")


@dataclass(frozen=True)
class SimulationRates:
    late_dispatch: float = 0.1
    """Share of shipments dispatched after their ship-by time."""
    transit_delay: float = 0.1
    """Share delivered after the promised time."""
    damage: float = 0.03
    """Share delivered with a damaged unit."""
    exception: float = 0.05
    """Share with a carrier exception on the way (a lost parcel is never delivered)."""
    partial_dispatch: float = 0.0
    """Share of multi-unit shipments the warehouse sends in two parts (分批运送)."""


RECOVER_EVERY_TICKS = 60
"""How often in-flight parcels are re-read from shipping (besides the first tick)."""


@dataclass(frozen=True)
class TrackingStep:
    at: datetime
    status: CarrierStatus
    extra: dict[str, Any] = field(default_factory=dict)


def plan_dispatch(allocated_at: datetime, ship_by: datetime, rng: random.Random, rates: SimulationRates) -> datetime:
    """When the warehouse will hand the shipment over."""
    window = max(ship_by - allocated_at, timedelta(seconds=1))
    if rng.random() < rates.late_dispatch:
        return ship_by + window * rng.uniform(0.1, 0.6)
    return allocated_at + window * rng.uniform(0.2, 0.9)


def plan_remainder_dispatch(allocated_at: datetime, ship_by: datetime, now: datetime, rng: random.Random) -> datetime:
    """The rest of a split shipment leaves a while after the first part."""
    window = max(ship_by - allocated_at, timedelta(seconds=1))
    return now + window * rng.uniform(0.1, 0.5)


def first_part(lines: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]] | None:
    """Some of a shipment's units, for a split dispatch; None when it cannot be split."""
    if sum(line["qty"] for line in lines) < 2:
        return None
    if len(lines) > 1:
        return lines[: rng.randint(1, len(lines) - 1)]
    (line,) = lines
    return [{**line, "qty": rng.randint(1, line["qty"] - 1)}]


def tracking_number_for(shipment_id: str) -> str:
    """Derived from the shipment, so a dispatch retried after a lost response is idempotent."""
    return "SIM" + hashlib.sha256(shipment_id.encode()).hexdigest()[:14].upper()


def plan_journey(
    shipped_at: datetime,
    promised_at: datetime,
    lines: list[dict[str, Any]],
    rng: random.Random,
    rates: SimulationRates,
) -> list[TrackingStep]:
    """The carrier's scans from pick-up to delivery (or loss), in event-time order."""
    window = max(promised_at - shipped_at, timedelta(seconds=1))
    if rng.random() < rates.transit_delay:
        arrive = promised_at + window * rng.uniform(0.1, 0.5)
    else:
        arrive = shipped_at + window * rng.uniform(0.5, 0.95)
    steps = [TrackingStep(shipped_at + (arrive - shipped_at) * 0.1, CarrierStatus.IN_TRANSIT)]
    if rng.random() < rates.exception:
        reason = rng.choice(list(ExceptionReason))
        at = shipped_at + (arrive - shipped_at) * 0.5
        if reason is ExceptionReason.LOST:
            return [*steps, TrackingStep(at, CarrierStatus.EXCEPTION, {"reason": reason.value})]
        arrive += window * rng.uniform(0.2, 0.6)
        estimate = {"reason": reason.value, "estimated_delivery_at": arrive.isoformat()}
        steps.append(TrackingStep(at, CarrierStatus.EXCEPTION, estimate))
    steps.append(TrackingStep(shipped_at + (arrive - shipped_at) * 0.85, CarrierStatus.OUT_FOR_DELIVERY))
    delivered = [
        {"line_no": line["line_no"], "sku": line["sku"], "qty_delivered": line["qty"], "qty_damaged": 0}
        for line in lines
    ]
    if delivered and rng.random() < rates.damage:
        rng.choice(delivered)["qty_damaged"] = 1
    steps.append(TrackingStep(arrive, CarrierStatus.DELIVERED, {"lines": delivered, "signed_by": rng.choice(SIGNERS)}))
    return steps


@dataclass
class TickReport:
    dispatched: int = 0
    tracking_events: int = 0
    refused: int = 0
    recovered: int = 0


@dataclass
class _Journey:
    tracking_number: str
    steps: list[TrackingStep]


class SimulatedCarrier:
    """The warehouse floor and the carrier, driven by ``tick()`` against shipping's HTTP API."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        carrier: str,
        secret: str,
        clock: Clock,
        rates: SimulationRates = SimulationRates(),
        seed: str = "",
    ) -> None:
        self.client = client
        self.carrier = carrier
        self.secret = secret
        self.clock = clock
        self.rates = rates
        self.seed = seed
        self.dispatch_at: dict[str, datetime] = {}
        self.journeys: dict[str, _Journey] = {}
        self.ticks = 0

    def _rng(self, shipment_id: str, purpose: str) -> random.Random:
        # One stream per shipment and purpose: the same plan after a restart.
        return random.Random(f"{self.seed}/{shipment_id}/{purpose}")

    async def tick(self) -> TickReport:
        report = TickReport()
        if self.ticks % RECOVER_EVERY_TICKS == 0:
            report.recovered = await self.recover()
        self.ticks += 1
        now = self.clock.now()
        pending = await self._shipments("pending")
        for shipment in pending:
            if shipment["id"] not in self.dispatch_at:
                self.dispatch_at[shipment["id"]] = self._plan_dispatch(shipment, now)
        still_pending = {shipment["id"]: shipment for shipment in pending}
        for shipment_id in [s for s in self.dispatch_at if s not in still_pending]:
            del self.dispatch_at[shipment_id]  # cancelled, or dispatched by someone else
        for shipment_id, due in sorted(self.dispatch_at.items(), key=lambda item: item[1]):
            if due <= now:
                del self.dispatch_at[shipment_id]
                if await self._dispatch(still_pending[shipment_id], due):
                    report.dispatched += 1
                else:
                    report.refused += 1
        for shipment_id, journey in list(self.journeys.items()):
            while journey.steps and journey.steps[0].at <= now:
                if not await self._post_scan(shipment_id, journey.tracking_number, journey.steps[0]):
                    break  # shipping is struggling: the same scan again next tick
                journey.steps.pop(0)
                report.tracking_events += 1
            if not journey.steps:
                del self.journeys[shipment_id]
        return report

    async def recover(self) -> int:
        """Pick up parcels in flight (ours, shipped, not delivered) that this process has no
        journey for, e.g. after a restart: the same plan, minus the scans already posted."""
        recovered = 0
        for shipment in await self._shipments("shipped"):
            if shipment["carrier"] != self.carrier or shipment["id"] in self.journeys:
                continue
            steps = self._plan_journey(shipment)
            posted_until = shipment.get("carrier_status_at")
            if posted_until is not None:
                # Scans are posted in event-time order: everything up to the latest is in.
                last = datetime.fromisoformat(posted_until)
                steps = [step for step in steps if step.at > last]
            if steps:
                self.journeys[shipment["id"]] = _Journey(shipment["tracking_number"], steps)
                recovered += 1
        return recovered

    async def run(self, interval: float) -> None:
        while True:
            try:
                report = await self.tick()
                if report.dispatched or report.tracking_events or report.recovered:
                    log.info("simulated: %s", report)
            except httpx.HTTPError as exc:
                log.warning("shipping unreachable, retrying: %s", exc)
            except Exception:
                # A demo keeps going; the next tick starts from shipping's state again.
                log.exception("simulator tick failed; retrying")
            await asyncio.sleep(interval)

    def _plan_dispatch(self, shipment: dict[str, Any], now: datetime) -> datetime:
        allocated_at = datetime.fromisoformat(shipment["allocated_at"])
        ship_by = datetime.fromisoformat(shipment["ship_by"])
        rng = self._rng(shipment["id"], "dispatch")
        if shipment.get("parent_shipment_id"):
            return plan_remainder_dispatch(allocated_at, ship_by, now, rng)
        return plan_dispatch(allocated_at, ship_by, rng, self.rates)

    def _plan_journey(self, shipment: dict[str, Any]) -> list[TrackingStep]:
        return plan_journey(
            datetime.fromisoformat(shipment["shipped_at"]),
            datetime.fromisoformat(shipment["original_promised_delivery_at"]),
            shipment["shipped_lines"],
            self._rng(shipment["id"], "journey"),
            self.rates,
        )

    async def _shipments(self, status: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"status": status, "limit": 500}
            if cursor:
                params["cursor"] = cursor
            response = await self.client.get("/v1/shipments", params=params)
            response.raise_for_status()
            page = response.json()
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    async def _dispatch(self, shipment: dict[str, Any], at: datetime) -> bool:
        shipment_id = shipment["id"]
        body: dict[str, Any] = {
            "carrier": self.carrier,
            "tracking_number": tracking_number_for(shipment_id),
            "dispatched_at": at.isoformat(),
        }
        rng = self._rng(shipment_id, "split")
        if rng.random() < self.rates.partial_dispatch and (part := first_part(shipment["lines"], rng)):
            body["lines"] = part
        response = await self.client.post(f"/v1/shipments/{shipment_id}/dispatch", json=body)
        if response.status_code != 200:
            # Cancelled meanwhile (409) or gone: nothing to carry.
            log.info("dispatch of %s refused: %s %s", shipment_id, response.status_code, response.text[:200])
            return False
        shipped = response.json()
        self.journeys[shipment_id] = _Journey(shipped["tracking_number"], self._plan_journey(shipped))
        return True

    async def _post_scan(self, shipment_id: str, tracking_number: str, step: TrackingStep) -> bool:
        """Post one scan; False when it should be tried again (shipping failing or throttling)."""
        payload = {
            "event_id": f"{tracking_number}-{step.status.value}",
            "tracking_number": tracking_number,
            "status": step.status.value,
            "occurred_at": step.at.isoformat(),
            **step.extra,
        }
        body = json.dumps(payload).encode()
        timestamp = int(self.clock.now().timestamp())
        response = await self.client.post(
            f"/v1/carriers/{self.carrier}/events",
            content=body,
            headers={
                "content-type": "application/json",
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, timestamp, body),
            },
        )
        if response.status_code == 200:
            return True
        log.warning("tracking event for %s refused: %s %s", shipment_id, response.status_code, response.text[:300])
        return not (response.status_code >= 500 or response.status_code == 429)
