"""The ``fulfil`` command line. Services add their own sub-commands through the
``fulfil.cli`` entry-point group (name = module:typer_app)."""

from __future__ import annotations

from importlib.metadata import entry_points

import typer
from fulfil.cli import dev, dlq, schema

app = typer.Typer(help="fulfil: event-driven order fulfilment tracking.", no_args_is_help=True)
app.command("dev")(dev.dev)
app.command("broker")(dev.broker)
app.command("schema")(schema.schema)
app.command("asyncapi")(schema.asyncapi)
app.add_typer(dlq.app, name="dlq")


def _add_service_commands() -> None:
    for entry in entry_points(group="fulfil.cli"):
        try:
            app.add_typer(entry.load(), name=entry.name)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            typer.echo(f"warning: could not load 'fulfil {entry.name}' commands: {exc}", err=True)


def main() -> None:
    _add_service_commands()
    app()
