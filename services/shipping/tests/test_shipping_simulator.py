"""The simulated warehouse and carrier drive the real endpoints; rates shape what happens."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fulfil.events import DelayStage, OrderDelayed, OrderDelivered
from shipping import service
from shipping.simulator import SimulatedCarrier, SimulationRates, tracking_number_for
from shipping_support import SECRET, T0, Harness, allocated, cancelled, new_order_id, received

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOUR = timedelta(hours=1)


async def orders(h: Harness, count: int) -> list[str]:
    ids = [new_order_id() for _ in range(count)]
    for i, order in enumerate(ids):
        await h.apply(received(order))
        await h.apply(allocated(order, warehouses=("wh-east", "wh-west") if i % 2 else ("wh-east",)))
    return ids


async def run_days(h: Harness, simulator: SimulatedCarrier, days: int) -> None:
    """Run the delay scanner and tick the simulator every three hours on the fake clock. The
    scanner looks first, so a shipment that became late since the last tick is seen late
    before the simulator catches up with it (plans differ per run: ids are random)."""
    for _ in range(days * 8):
        h.clock.advance(3 * HOUR)
        await service.scan_for_delays(h.runtime.sessions, h.settings, h.clock.now())
        await simulator.tick()


def carrier(h: Harness, rates: SimulationRates, seed: int) -> SimulatedCarrier:
    return SimulatedCarrier(h.client, carrier="acme", secret=SECRET, clock=h.clock, rates=rates, seed=str(seed))


QUIET = SimulationRates(late_dispatch=0, transit_delay=0, damage=0, exception=0)


async def test_with_no_trouble_every_shipment_is_delivered_on_time(h: Harness) -> None:
    ids = await orders(h, 6)
    quiet = SimulationRates(late_dispatch=0, transit_delay=0, damage=0, exception=0)
    await run_days(h, carrier(h, quiet, seed=1), days=6)
    for order in ids:
        for shipment in await h.shipments(order):
            assert shipment["status"] == "delivered"
            assert (shipment["late_dispatch"], shipment["late_delivery"]) == (False, False)
        assert await h.staged(order, "order.delayed") == []
        delivered = await h.staged(order, "order.delivered")
        assert len(delivered) == len(await h.shipments(order))
        assert all(isinstance(e, OrderDelivered) and not any(line.qty_damaged for line in e.lines) for e in delivered)


async def test_late_and_damaged_everything_is_noticed(h: Harness) -> None:
    ids = await orders(h, 4)
    troubled = SimulationRates(late_dispatch=1, transit_delay=1, damage=1, exception=0)
    await run_days(h, carrier(h, troubled, seed=2), days=9)
    for order in ids:
        shipments = await h.shipments(order)
        assert all(s["status"] == "delivered" and s["late_dispatch"] and s["late_delivery"] for s in shipments)
        delays = [e for e in await h.staged(order, "order.delayed") if isinstance(e, OrderDelayed)]
        first_notices = [d for d in delays if ": still late" not in d.reason]
        stages = sorted((d.shipment_id or "", d.stage.value) for d in first_notices)
        expected = sorted(
            (s["id"], stage.value) for s in shipments for stage in (DelayStage.DISPATCH, DelayStage.TRANSIT)
        )
        # One notice per (shipment, stage); the very late may add an escalation a day later.
        assert stages == expected
        delivered = [e for e in await h.staged(order, "order.delivered") if isinstance(e, OrderDelivered)]
        assert all(sum(line.qty_damaged for line in e.lines) == 1 for e in delivered)


async def test_carrier_exceptions_and_cancellations(h: Harness) -> None:
    ids = await orders(h, 4)
    await h.apply(cancelled(ids[0], at=T0 + timedelta(minutes=1)))
    simulator = carrier(h, SimulationRates(late_dispatch=0, transit_delay=0, damage=0, exception=1), seed=3)
    await run_days(h, simulator, days=8)
    assert [s["status"] for s in await h.shipments(ids[0])] == ["cancelled"]
    for order in ids[1:]:
        delays = [e for e in await h.staged(order, "order.delayed") if isinstance(e, OrderDelayed)]
        assert [d.stage for d in delays if d.stage is DelayStage.CARRIER_EXCEPTION] == [
            DelayStage.CARRIER_EXCEPTION
        ] * len(await h.shipments(order))


async def test_a_restarted_simulator_delivers_the_parcels_already_on_their_way(h: Harness) -> None:
    ids = await orders(h, 4)
    before = carrier(h, QUIET, seed=4)
    await run_days(h, before, days=2)
    shipments = [s for order in ids for s in await h.shipments(order)]
    assert {s["status"] for s in shipments} == {"shipped"}
    assert {s["id"] for s in shipments} <= set(before.journeys)
    assert any(s["carrier_status"] == "in_transit" for s in shipments)

    # The demo restarts: a new process knows nothing, and finds its parcels in shipping.
    after = carrier(h, QUIET, seed=4)
    await run_days(h, after, days=5)
    for order in ids:
        shipments = await h.shipments(order)
        assert {s["status"] for s in shipments} == {"delivered"}
        assert len(await h.staged(order, "order.delivered")) == len(shipments)
        for shipment in shipments:
            timeline = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()["timeline"]
            # Scans the first process had posted were not posted again.
            assert [e["kind"] for e in timeline].count("carrier_in_transit") == 1


async def test_a_dispatch_retried_after_a_lost_response_is_the_same_dispatch(h: Harness) -> None:
    (order,) = await orders(h, 1)
    (shipment,) = await h.shipments(order)
    simulator = carrier(h, QUIET, seed=5)
    h.clock.advance(2 * HOUR)
    assert await simulator._dispatch(shipment, h.clock.now())
    assert await simulator._dispatch(shipment, h.clock.now())  # same tracking number: idempotent
    assert len(await h.staged(order, "order.shipped")) == 1
    assert tracking_number_for(shipment["id"]) == (await h.shipments(order))[0]["tracking_number"]


async def test_split_dispatches_deliver_every_unit(h: Harness) -> None:
    ids = await orders(h, 4)
    splitting = SimulationRates(late_dispatch=0, transit_delay=0, damage=0, exception=0, partial_dispatch=1)
    await run_days(h, carrier(h, splitting, seed=6), days=9)
    for order in ids:
        shipments = await h.shipments(order)
        assert any(s["remainder_shipment_id"] for s in shipments)
        assert {s["status"] for s in shipments} == {"delivered"}
        delivered = [e for e in await h.staged(order, "order.delivered") if isinstance(e, OrderDelivered)]
        units = sorted(
            (line.line_no, line.sku) for e in delivered for line in e.lines for _ in range(line.qty_delivered)
        )
        assert units == [(1, "SKU-A"), (1, "SKU-A"), (2, "SKU-B")]
