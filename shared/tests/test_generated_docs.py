"""docs/events.schema.json and docs/asyncapi.json are generated from the models, never
written by hand: regenerate with `fulfil schema -o ...` / `fulfil asyncapi -o ...`."""

from __future__ import annotations

import json
from pathlib import Path

from fulfil.cli import app
from fulfil.cli.schema import asyncapi_document
from fulfil.events import CATALOGUE, json_schema
from typer.testing import CliRunner

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_json_schema_matches_the_models() -> None:
    assert json.loads((DOCS / "events.schema.json").read_text()) == json_schema()


def test_committed_asyncapi_matches_the_models() -> None:
    assert json.loads((DOCS / "asyncapi.json").read_text()) == asyncapi_document()


def test_asyncapi_describes_every_event_with_resolvable_refs() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    assert document["channels"]["orderEvents"]["address"] == "order-events"
    messages = document["components"]["messages"]
    assert {message["name"] for message in messages.values()} == set(CATALOGUE)
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/')[1:]}:
        node = document
        for key in ref.split("/"):
            node = node[key]  # raises KeyError on a dangling reference


def test_schema_command_prints_json() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    assert "OrderReceived" in json.loads(result.stdout)["$defs"]
