"""`fulfil clients ...`: manage the API clients of order-intake."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from fulfil import db
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from order_intake import service
from order_intake.config import Settings
from order_intake.models import IntakeTable

app = typer.Typer(help="API clients of order-intake (ERP and shop systems).", no_args_is_help=True)

DEV_DATABASE_ENV = "DATABASE_URL_ORDER_INTAKE"
"""What `fulfil dev` passes to order-intake as its DATABASE_URL, when set."""


@app.callback()
def clients() -> None:
    """API clients of order-intake (ERP and shop systems)."""


def dev_database_url(data_dir: Path) -> str:
    """The database of the order-intake that `fulfil dev` runs: DATABASE_URL_ORDER_INTAKE if set,
    else the service's own default, the SQLite file under ``data_dir``. Never the caller's
    DATABASE_URL, which `fulfil dev` does not pass on to the services."""
    configured = os.environ.get(DEV_DATABASE_ENV) or None
    # Constructed, not read from the environment: only what `fulfil dev` sets counts here.
    settings = Settings.model_construct(database_url=configured, data_dir=str(data_dir), service_name="order-intake")
    return settings.database


def shown(url: str) -> str:
    """The URL with any password hidden, to say which database was written."""
    return make_url(url).render_as_string(hide_password=True)


async def _with_session(url: str, name: str, *, rotate: bool) -> tuple[str, str]:
    engine = db.create_engine(url)
    try:
        await db.create_tables(engine, [IntakeTable.metadata])
        async with db.session_factory(engine)() as session:
            now = service.system_clock()
            if rotate:
                client, key = await service.issue_key(session, name, now)
            else:
                client, key = await service.create_client(session, name, now)
            return client.id, key
    finally:
        await engine.dispose()


def issue_dev_key(url: str, name: str) -> tuple[str, str]:
    """(client id, new key) for the named client, created if missing."""
    return asyncio.run(_with_session(url, name, rotate=True))


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="a unique name for the calling system, e.g. erp-east (1-100 characters)")],
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar=[DEV_DATABASE_ENV, "DATABASE_URL"],
            show_envvar=True,
            help="order-intake's database [default: the dev SQLite file under --data-dir]",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="where the dev SQLite database lives")] = Path(".fulfil"),
) -> None:
    """Create a client and print its API key (shown once; only its hash is stored)."""
    try:
        service.check_client_name(name)
    except service.InvalidClientName as exc:
        raise typer.BadParameter(str(exc), param_hint="'NAME'") from None
    url = database_url or dev_database_url(data_dir)
    try:
        client_id, key = asyncio.run(_with_session(url, name, rotate=False))
    except IntegrityError:
        typer.echo(f"a client named {name!r} already exists in {shown(url)}", err=True)
        raise typer.Exit(1) from None
    except (DBAPIError, OSError) as exc:
        typer.echo(f"could not create the client in {shown(url)}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"client {name} ({client_id}) in {shown(url)}")
    typer.echo(f"API key (shown once): {key}")
