"""Generated documents of the event catalogue: JSON Schema and AsyncAPI 3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from fulfil.codec import CONTENT_TYPE, SCHEMA_URN
from fulfil.events import CATALOGUE, json_schema

OutputOption = Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")]


def _emit(document: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


def schema(output: OutputOption = None) -> None:
    """Print the JSON Schema of every order event (generated from the models)."""
    _emit(json_schema(), output)


def asyncapi_document(topic: str = "order-events", dlq_topic: str = "order-events.dlq") -> dict[str, Any]:
    """AsyncAPI 3.0 description of the order-events topic, from the same models."""
    definitions = json_schema()["$defs"]
    messages: dict[str, Any] = {}
    for event_type, model in CATALOGUE.items():
        name = model.__name__
        messages[name] = {
            "name": event_type,
            "title": name,
            "summary": (model.__doc__ or event_type).strip().splitlines()[0],
            "contentType": CONTENT_TYPE,
            "headers": {
                "type": "object",
                "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject"],
                "properties": {
                    "ce_specversion": {"const": "1.0"},
                    "ce_id": {"type": "string"},
                    "ce_source": {"type": "string", "format": "uri-reference"},
                    "ce_type": {"const": event_type},
                    "ce_time": {"type": "string", "format": "date-time"},
                    "ce_subject": {"type": "string", "description": "the order id"},
                    "ce_dataschema": {"const": SCHEMA_URN.format(type=event_type, version=model.schema_version)},
                },
            },
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "bindings": {"kafka": {"key": {"type": "string", "description": "order id"}, "bindingVersion": "0.5.0"}},
        }
    schemas = {name: _rebase_refs(definition) for name, definition in definitions.items()}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "fulfil order events",
            "version": "1.0.0",
            "description": "CloudEvents 1.0 in the Kafka binding's binary mode, keyed by order id.",
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": {
            "orderEvents": {
                "address": topic,
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
                "bindings": {"kafka": {"partitions": 6, "bindingVersion": "0.5.0"}},
            },
            "orderEventsDeadLetters": {
                "address": dlq_topic,
                "description": "Records a consumer group could not apply, with dlq_* headers naming group and error.",
            },
        },
        "operations": {
            "publishOrderEvents": {
                "action": "send",
                "channel": {"$ref": "#/channels/orderEvents"},
                "messages": [{"$ref": f"#/channels/orderEvents/messages/{name}"} for name in messages],
            },
            "consumeOrderEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/orderEvents"},
                "messages": [{"$ref": f"#/channels/orderEvents/messages/{name}"} for name in messages],
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    }


def _rebase_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (value.replace("#/$defs/", "#/components/schemas/") if key == "$ref" else _rebase_refs(value))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebase_refs(item) for item in node]
    return node


def asyncapi(output: OutputOption = None) -> None:
    """Print the AsyncAPI 3 document of the order-events topic."""
    _emit(asyncapi_document(), output)
