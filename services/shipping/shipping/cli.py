"""``fulfil demo``: the simulated warehouse, stockroom and carrier, and customers placing
orders, against a running stack. ``fulfil dev`` runs it by default as one more child
process, with shipping's TIME_COMPRESSION and an order-intake key in FULFIL_API_KEY."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Annotated

import httpx
import typer
from fulfil.logs import configure_logging
from rich.console import Console

from shipping.clock import SystemClock
from shipping.config import DEV_CARRIER_SECRET
from shipping.orders import OrderGenerator
from shipping.simulator import SimulatedCarrier, SimulationRates
from shipping.stockroom import Stockroom

log = logging.getLogger(__name__)

app = typer.Typer(help="Simulated warehouse, carrier and customers for demos and load.")
console = Console()


@app.callback(invoke_without_command=True)
def demo(
    shipping_url: Annotated[str, typer.Option(help="The shipping service")] = "http://127.0.0.1:8003",
    carrier: Annotated[str, typer.Option(help="Carrier name configured in shipping")] = "simcarrier",
    late_dispatch: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    transit_delay: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    damage: Annotated[float, typer.Option(min=0, max=1)] = 0.03,
    exception: Annotated[float, typer.Option(min=0, max=1)] = 0.05,
    partial_dispatch: Annotated[float, typer.Option(min=0, max=1, help="Share of shipments sent in two parts")] = 0.05,
    time_compression: Annotated[
        float,
        typer.Option(min=1, help="Simulated seconds per real second; start shipping with the same TIME_COMPRESSION"),
    ] = 1.0,
    order_intake_url: Annotated[str, typer.Option(help="order-intake, for generated orders")] = "http://127.0.0.1:8001",
    api_key: Annotated[
        str | None, typer.Option(envvar="FULFIL_API_KEY", help="order-intake client key; no orders without it")
    ] = None,
    orders_per_day: Annotated[float, typer.Option(min=0, help="Generated orders per simulated day")] = 2000,
    inventory_url: Annotated[str, typer.Option(help="inventory, for seeding and restocking")] = "http://127.0.0.1:8002",
    stock: Annotated[
        bool, typer.Option(help="Seed warehouses and stock for the generated SKUs, and restock periodically")
    ] = True,
    restock_hours: Annotated[float, typer.Option(min=0.01, help="Simulated hours between restock rounds")] = 6.0,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between simulator ticks")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for a repeatable run")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds")] = None,
) -> None:
    """Dispatch pending shipments and post signed tracking events; keep inventory stocked;
    with an order-intake key (FULFIL_API_KEY), place orders too."""
    configure_logging("demo", json_lines=False)
    # One line per HTTP request would drown what the simulator says.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    secret = os.environ.get("CARRIER_SECRET", DEV_CARRIER_SECRET)
    rates = SimulationRates(late_dispatch, transit_delay, damage, exception, partial_dispatch)
    if time_compression != 1:
        console.print(
            f"time compression x{time_compression:g}: run shipping with TIME_COMPRESSION={time_compression:g}"
        )
    plan = DemoPlan(
        shipping_url=shipping_url,
        carrier=carrier,
        secret=secret,
        rates=rates,
        order_intake_url=order_intake_url,
        api_key=api_key,
        orders_per_second=orders_per_day * time_compression / 86_400,
        time_compression=time_compression,
        inventory_url=inventory_url if stock else None,
        restock_seconds=restock_hours * 3600 / time_compression,
        interval=interval,
        seed=seed,
        duration=duration,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(plan))


@dataclass(frozen=True)
class DemoPlan:
    shipping_url: str
    carrier: str
    secret: str
    rates: SimulationRates
    order_intake_url: str
    api_key: str | None
    orders_per_second: float
    time_compression: float
    inventory_url: str | None
    restock_seconds: float
    interval: float
    seed: int | None
    duration: float | None


async def _run(plan: DemoPlan) -> None:
    rng = random.Random(plan.seed)
    main = asyncio.current_task()
    assert main is not None
    # SIGTERM (fulfil dev stopping, a container stop) ends the demo as cleanly as Ctrl-C.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    async with (
        httpx.AsyncClient(base_url=plan.shipping_url, timeout=10) as shipping,
        httpx.AsyncClient(base_url=plan.order_intake_url, timeout=10) as intake,
        httpx.AsyncClient(base_url=plan.inventory_url or "http://inventory.invalid", timeout=10) as inventory,
    ):
        simulator = SimulatedCarrier(
            shipping,
            carrier=plan.carrier,
            secret=plan.secret,
            clock=SystemClock(),
            rates=plan.rates,
            seed="" if plan.seed is None else str(plan.seed),
        )
        tasks = [asyncio.create_task(simulator.run(plan.interval), name="carrier")]
        if plan.inventory_url is not None:
            tasks.append(asyncio.create_task(Stockroom(inventory).run(plan.restock_seconds), name="stockroom"))
            console.print(f"stocking warehouses through {plan.inventory_url}", highlight=False)
        if plan.api_key and plan.orders_per_second > 0:
            generator = OrderGenerator(intake, api_key=plan.api_key, rng=rng, time_compression=plan.time_compression)
            tasks.append(asyncio.create_task(_place_orders(generator, plan.orders_per_second), name="orders"))
            console.print(
                f"placing about {plan.orders_per_second * 60:.0f} orders a minute at {plan.order_intake_url}",
                highlight=False,
            )
        else:
            console.print("no --api-key: not generating orders (set FULFIL_API_KEY to a client key of order-intake)")
        console.print(
            f"simulating carrier {plan.carrier!r} against {plan.shipping_url}; Ctrl-C to stop", highlight=False
        )
        try:
            await asyncio.wait(tasks, timeout=plan.duration, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            console.print("demo stopping")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _place_orders(generator: OrderGenerator, per_second: float) -> None:
    clock = SystemClock()
    while True:
        try:
            response = await generator.post_one(clock.now())
            if response.status_code >= 400:
                log.warning("order refused: %s %s", response.status_code, response.text[:200])
        except httpx.HTTPError as exc:
            log.warning("order-intake unreachable: %s", exc)
        await asyncio.sleep(generator.rng.expovariate(per_second))
