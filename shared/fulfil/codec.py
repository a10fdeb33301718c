"""CloudEvents 1.0, Kafka protocol binding, binary content mode.

Attributes travel as ``ce_*`` headers, the event data as the JSON record value, the
order id as the record key (so one order's events stay in one partition, in order).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fulfil.events import CATALOGUE, OrderEvent, upcast
from pydantic import ValidationError

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
SCHEMA_URN = "urn:fulfil:schema:{type}:{version}"
_SCHEMA_URN = re.compile(r"^urn:fulfil:schema:(?P<type>[a-z.]+):(?P<version>\d+)$")

Headers = list[tuple[str, bytes]]


class UndecodableRecord(ValueError):
    """A record that is not a valid fulfil CloudEvent; it belongs in the DLQ."""


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    key: bytes
    value: bytes
    headers: Headers


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded CloudEvent: its context attributes and its typed data."""

    id: str
    source: str
    type: str
    time: datetime
    subject: str
    data: OrderEvent


def new_event_id() -> str:
    return str(uuid.uuid4())


def encode(event: OrderEvent, *, source: str, event_id: str | None = None) -> tuple[str, KafkaRecord]:
    """Return (ce_id, record) for one event."""
    ce_id = event_id or new_event_id()
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION.encode()),
        ("ce_id", ce_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", event.type.encode()),
        ("ce_time", event.occurred_at.isoformat().encode()),
        ("ce_subject", event.order_id.encode()),
        ("ce_dataschema", SCHEMA_URN.format(type=event.type, version=event.schema_version).encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]
    value = event.model_dump_json(exclude={"type"}).encode()
    return ce_id, KafkaRecord(key=event.order_id.encode(), value=value, headers=headers)


@functools.cache
def _current_urn(event_type: str, version: int) -> str:
    return SCHEMA_URN.format(type=event_type, version=version)


def header_map(headers: Any) -> dict[str, bytes]:
    return {name.lower(): value for name, value in headers or ()}


_REQUIRED = ("specversion", "id", "source", "type")


@dataclass(frozen=True, slots=True)
class Attributes:
    """A record's CloudEvents context attributes, read without touching its data."""

    id: str
    source: str
    type: str
    subject: str | None
    dataschema: str | None


def read_attributes(headers: Any) -> Attributes:
    """Read and check the ``ce_*`` headers; raise ``UndecodableRecord`` if they are not ours."""
    ce: dict[str, str] = {}
    try:
        for name, raw in headers or ():
            if name[:3].lower() == "ce_":
                ce[name[3:].lower()] = raw.decode()
    except UnicodeDecodeError as exc:
        raise UndecodableRecord(f"header is not UTF-8: {exc}") from exc
    missing = [name for name in _REQUIRED if not ce.get(name)]
    if missing:
        raise UndecodableRecord(f"missing CloudEvents attributes: {', '.join(missing)}")
    if ce["specversion"] != SPEC_VERSION:
        raise UndecodableRecord(f"unsupported specversion {ce['specversion']!r}")
    if ce["type"] not in CATALOGUE:
        raise UndecodableRecord(f"unknown event type {ce['type']!r}")
    return Attributes(ce["id"], ce["source"], ce["type"], ce.get("subject"), ce.get("dataschema"))


def decode_data(attributes: Attributes, value: bytes | None) -> Envelope:
    """Validate the record value as the data of the event its attributes name."""
    event_type = attributes.type
    model = CATALOGUE[event_type]
    if value is None:
        raise UndecodableRecord("record has no value")
    version = _schema_version(attributes.dataschema, event_type, model.schema_version)
    try:
        if version == model.schema_version:
            data = model.model_validate_json(value)
        else:
            data = model.model_validate(upcast(event_type, version, json.loads(value)))
    except (ValidationError, ValueError, KeyError) as exc:
        raise UndecodableRecord(f"invalid {event_type} data: {exc}") from exc
    return Envelope(
        id=attributes.id,
        source=attributes.source,
        type=event_type,
        time=data.occurred_at,
        subject=attributes.subject or data.order_id,
        data=data,
    )


def decode(key: bytes | None, value: bytes | None, headers: Any) -> Envelope:
    """Decode one record; raise ``UndecodableRecord`` saying what is wrong with it."""
    return decode_data(read_attributes(headers), value)


def _schema_version(dataschema: str | None, event_type: str, current: int) -> int:
    if not dataschema:
        return current
    if dataschema == _current_urn(event_type, current):
        return current
    match = _SCHEMA_URN.match(dataschema)
    if match is None or match["type"] != event_type:
        raise UndecodableRecord(f"dataschema {dataschema!r} does not name {event_type}")
    version = int(match["version"])
    if version > current:
        raise UndecodableRecord(f"{event_type} schema version {version} is newer than this service knows ({current})")
    return version
