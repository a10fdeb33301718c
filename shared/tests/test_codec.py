"""The CloudEvents Kafka binary binding, checked against the official SDK."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cloudevents.v1.kafka import KafkaMessage, from_binary, to_binary
from fulfil import events
from fulfil.codec import UndecodableRecord, decode, encode
from fulfil.events import OrderCancelled

from tests.support.orders import order_received


def test_roundtrip_keeps_attributes_and_data() -> None:
    event = order_received("o-42")
    ce_id, record = encode(event, source="/fulfil/order-intake")
    envelope = decode(record.key, record.value, record.headers)
    assert envelope.id == ce_id
    assert envelope.source == "/fulfil/order-intake"
    assert envelope.type == "order.received"
    assert envelope.subject == "o-42"
    assert envelope.data == event
    assert record.key == b"o-42"


def test_the_official_sdk_reads_our_records() -> None:
    event = order_received("o-7")
    ce_id, record = encode(event, source="/fulfil/order-intake")
    sdk_event = from_binary(KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value))
    assert sdk_event["specversion"] == "1.0"
    assert sdk_event["id"] == ce_id
    assert sdk_event["type"] == "order.received"
    assert sdk_event["source"] == "/fulfil/order-intake"
    assert sdk_event["subject"] == "o-7"
    assert sdk_event["datacontenttype"] == "application/json"
    assert sdk_event["time"] == event.occurred_at.isoformat()
    assert sdk_event["partitionkey"] == b"o-7"
    assert sdk_event.get_data() == json.loads(event.model_dump_json(exclude={"type"}))


def test_we_read_records_the_official_sdk_writes() -> None:
    from cloudevents.v1.http import CloudEvent

    event = order_received("o-8")
    attributes = {
        "type": "order.received",
        "source": "/erp",
        "subject": "o-8",
        "partitionkey": "o-8",
        "time": event.occurred_at.isoformat(),
        "datacontenttype": "application/json",
    }
    sdk_event = CloudEvent(attributes, json.loads(event.model_dump_json(exclude={"type"})))
    message = to_binary(sdk_event)
    envelope = decode(message.key, message.value, list(message.headers.items()))
    assert envelope.data == event
    assert (envelope.id, envelope.source, envelope.type, envelope.subject) == (
        sdk_event["id"],
        "/erp",
        "order.received",
        "o-8",
    )
    assert envelope.time == event.occurred_at


def _headers(record: Any, **replace: bytes | None) -> list[tuple[str, bytes]]:
    kept = [(name, value) for name, value in record.headers if name not in replace]
    return kept + [(name, value) for name, value in replace.items() if value is not None]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ce_type": b"order.exploded"}, "unknown event type"),
        ({"ce_id": None}, "missing CloudEvents attributes: id"),
        ({"ce_specversion": b"0.3"}, "unsupported specversion"),
        ({"ce_dataschema": b"urn:fulfil:schema:order.received:9"}, "newer than this service knows"),
        ({"ce_dataschema": b"urn:fulfil:schema:order.cancelled:1"}, "does not name"),
        ({"ce_source": b"\xff\xfe"}, "not UTF-8"),
    ],
)
def test_bad_attributes_are_refused_with_the_reason(change: dict[str, bytes | None], message: str) -> None:
    _, record = encode(order_received("o-1"), source="/t")
    with pytest.raises(UndecodableRecord, match=message):
        decode(record.key, record.value, _headers(record, **change))


@pytest.mark.parametrize("value", [b"{not json", b'{"order_id": "o-1"}', b"", None])
def test_bad_data_is_refused(value: bytes | None) -> None:
    _, record = encode(order_received("o-1"), source="/t")
    with pytest.raises(UndecodableRecord):
        decode(record.key, value, record.headers)


def test_old_schema_versions_are_upcast_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    event = OrderCancelled(order_id="o-1", occurred_at=order_received("o-1").occurred_at, reason="late")
    _, record = encode(event, source="/t")
    old_value = json.dumps({**json.loads(record.value), "why": "late"}).replace('"reason": "late", ', "").encode()
    monkeypatch.setattr(OrderCancelled, "schema_version", 2)
    monkeypatch.setitem(events.UPCASTERS, ("order.cancelled", 1), lambda d: {**d, "reason": d.pop("why")})
    envelope = decode(record.key, old_value, record.headers)  # headers still say version 1
    assert isinstance(envelope.data, OrderCancelled)
    assert envelope.data.reason == "late"
