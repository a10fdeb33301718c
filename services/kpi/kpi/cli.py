"""`fulfil kpi ...`: operations on the KPI state."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from kpi.config import Settings
from kpi.rebuild import rebuild

app = typer.Typer(help="KPI service operations.", no_args_is_help=True)


@app.callback()
def kpi() -> None:
    """KPI service operations (a group, so the command is spelled `fulfil kpi rebuild`)."""


@app.command("rebuild")
def rebuild_command() -> None:
    """Reset the KPI state and replay the order-events topic from the start."""
    settings = Settings()
    stats = asyncio.run(rebuild(settings))
    Console().print(
        f"replayed {stats.records} records of {settings.kafka_topic}: {stats.applied} applied, "
        f"{stats.undecodable} undecodable skipped; {stats.orders} orders"
    )
