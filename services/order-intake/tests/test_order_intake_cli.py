"""`fulfil clients create` and the `fulfil dev` hook: keys printed once, stored hashed, usable."""

from __future__ import annotations

import asyncio
import io
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fulfil import db
from order_intake import service
from order_intake.cli import app
from order_intake.dev import hook
from order_intake.models import ApiClient
from rich.console import Console
from sqlmodel import select
from typer.testing import CliRunner

KEY = re.compile(r"fk_[A-Za-z0-9_-]{40,}")


async def clients_in(url: str) -> dict[str, tuple[str, str | None]]:
    """name -> (key hash, name of the client a key authenticates as)."""
    engine = db.create_engine(url)
    try:
        async with db.session_factory(engine)() as session:
            return {c.name: (c.key_hash, None) for c in (await session.exec(select(ApiClient))).all()}
    finally:
        await engine.dispose()


async def authenticates_as(url: str, key: str) -> str | None:
    engine = db.create_engine(url)
    try:
        async with db.session_factory(engine)() as session:
            client = await service.authenticate(session, key)
            return client.name if client else None
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def no_database_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL_ORDER_INTAKE", raising=False)


def test_clients_create_prints_a_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["create", "erp-east", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    key = KEY.search(result.output)
    assert key is not None
    url = f"sqlite+aiosqlite:///{tmp_path}/order-intake.db"
    stored = asyncio.run(clients_in(url))
    assert stored["erp-east"][0] == service.hash_key(key.group())
    assert key.group() not in (tmp_path / "order-intake.db").read_bytes().decode("latin-1")
    assert asyncio.run(authenticates_as(url, key.group())) == "erp-east"
    again = runner.invoke(app, ["create", "erp-east", "--data-dir", str(tmp_path)])
    assert again.exit_code == 1
    assert "already exists" in again.output


@pytest.mark.parametrize("name", ["x" * 101, "", " erp", "erp\x00east", "erp\nwest"])
def test_clients_create_refuses_a_bad_name_with_a_message_not_a_traceback(
    database_url: str, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    result = CliRunner().invoke(app, ["create", name])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not an exception escaping
    assert "client name" in result.output
    assert "Traceback" not in result.output


def test_clients_create_says_which_database_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/dev-intake.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/other.db")
    monkeypatch.setenv("DATABASE_URL_ORDER_INTAKE", url)  # what `fulfil dev` runs order-intake on
    result = CliRunner().invoke(app, ["create", "shop-west"])
    assert result.exit_code == 0, result.output
    assert url in result.output
    assert list(asyncio.run(clients_in(url))) == ["shop-west"]
    assert not (tmp_path / "other.db").exists()


def test_dev_hook_issues_the_dev_client_a_fresh_working_key(tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        out = io.StringIO()
        hook(urls={"order-intake": "http://127.0.0.1:8001"}, data_dir=tmp_path, console=Console(file=out, width=300))
        found = KEY.search(out.getvalue())
        assert found is not None
        keys.append(found.group())
    url = f"sqlite+aiosqlite:///{tmp_path}/order-intake.db"
    assert list(asyncio.run(clients_in(url))) == ["dev"]  # reused, not duplicated
    assert asyncio.run(authenticates_as(url, keys[1])) == "dev"
    assert asyncio.run(authenticates_as(url, keys[0])) is None  # the previous key was rotated out


def run_hook(data_dir: Path, base: str = "http://127.0.0.1:9") -> tuple[str, str]:
    out = io.StringIO()
    hook(urls={"order-intake": base}, data_dir=data_dir, console=Console(file=out, width=300))
    found = KEY.search(out.getvalue())
    assert found is not None
    return found.group(), out.getvalue()


def test_dev_hook_writes_to_the_database_fulfil_dev_gives_order_intake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fulfil dev` runs order-intake on DATABASE_URL_ORDER_INTAKE, else on its SQLite default, and
    never on the DATABASE_URL of the shell that started it."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/somewhere-else.db")
    key, _ = run_hook(tmp_path)
    assert asyncio.run(authenticates_as(f"sqlite+aiosqlite:///{tmp_path}/order-intake.db", key)) == "dev"
    assert not (tmp_path / "somewhere-else.db").exists()

    chosen = f"sqlite+aiosqlite:///{tmp_path}/chosen.db"
    monkeypatch.setenv("DATABASE_URL_ORDER_INTAKE", chosen)
    key, _ = run_hook(tmp_path)
    assert asyncio.run(authenticates_as(chosen, key)) == "dev"


class _Refusing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401 if "Bearer" in self.headers.get("Authorization", "") else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_dev_hook_warns_when_the_running_service_refuses_the_key(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, printed = run_hook(tmp_path, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert "refuses the dev key" in printed
    _, quiet = run_hook(tmp_path)  # nothing answers there: nothing to warn about
    assert "refuses" not in quiet
