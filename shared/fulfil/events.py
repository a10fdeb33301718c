"""The one catalogue of order events.

Every event that crosses a service boundary is declared here, once, as a frozen
Pydantic model. The ``type`` literal is the CloudEvents ``ce_type``; ``schema_version``
is part of the ``ce_dataschema`` URI. A breaking change to an event's data is a new
schema version with an upcaster from the old one (see ``UPCASTERS``), never an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

Quantity = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]
HandlingHours = Annotated[int, Field(ge=0, le=24 * 30, strict=True)]
Count = Annotated[int, Field(ge=0, le=1_000_000, strict=True)]


class CustomerTier(StrEnum):
    """核心客户 (core) get protected stock and are served first from the backorder queue."""

    CORE = "core"
    STANDARD = "standard"


class Locale(StrEnum):
    EN = "en"
    ZH_CN = "zh-CN"


class ServiceLevel(StrEnum):
    STANDARD = "standard"
    EXPRESS = "express"
    ECONOMY = "economy"


class DelayStage(StrEnum):
    DISPATCH = "dispatch"
    TRANSIT = "transit"
    CARRIER_EXCEPTION = "carrier_exception"


class Frozen(BaseModel):
    # Tolerant reader: a field added by a newer producer must not break an older consumer.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Contact(Frozen):
    email: str | None = None
    phone: str | None = None


class Customer(Frozen):
    id: str
    tier: CustomerTier = CustomerTier.STANDARD
    locale: Locale = Locale.EN
    contact: Contact = Contact()


class Address(Frozen):
    name: str
    line1: str
    city: str
    postal_code: str
    country: str


class OrderedLine(Frozen):
    line_no: Annotated[int, Field(ge=1, strict=True)]
    sku: str
    qty: Quantity
    substitutes: tuple[str, ...] = ()
    """SKUs the customer has consented to receive instead (替代商品, only with consent)."""


class AllocatedLine(Frozen):
    line_no: int
    sku: str
    """The SKU actually reserved: the ordered one, or a consented substitute."""
    qty: Quantity
    warehouse_id: str
    substitute_for: str | None = None
    """The ordered SKU when ``sku`` is a substitute for it."""


class LineQuantity(Frozen):
    line_no: int
    sku: str
    qty: Quantity


class DeliveredLine(Frozen):
    line_no: int
    sku: str
    qty_delivered: Count
    qty_damaged: Count = 0


class OrderEvent(Frozen):
    """What every order event carries: the order it is about and when it happened."""

    schema_version: ClassVar[int] = 1
    type: str
    order_id: str = Field(min_length=1, max_length=64)
    occurred_at: AwareDatetime
    """Event time: when it happened in the world. KPIs use this, never read time."""

    @field_validator("occurred_at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @classmethod
    def event_type(cls) -> str:
        default = cls.model_fields["type"].default
        assert isinstance(default, str)
        return default


class OrderReceived(OrderEvent):
    type: Literal["order.received"] = "order.received"
    client: str
    external_ref: str
    customer: Customer
    lines: tuple[OrderedLine, ...] = Field(min_length=1)
    ship_to: Address
    placed_at: AwareDatetime
    requested_delivery_date: date | None = None
    service_level: ServiceLevel = ServiceLevel.STANDARD
    allow_partial: bool = True

    def skus(self) -> set[str]:
        """Every SKU the order could be filled with: ordered ones and consented substitutes."""
        return {line.sku for line in self.lines} | {s for line in self.lines for s in line.substitutes}

    def units(self) -> int:
        return sum(line.qty for line in self.lines)


class OrderAllocated(OrderEvent):
    type: Literal["order.allocated"] = "order.allocated"
    allocations: tuple[AllocatedLine, ...] = Field(min_length=1)
    complete: bool
    """All lines of the order are now covered."""
    first_pass: bool
    """Allocated on receipt (counts toward first-pass fill rate), not by a later restock."""
    handling_hours: dict[str, HandlingHours] = Field(default_factory=dict)
    """The handling time (ship-by SLA after allocation) of each warehouse of the allocation,
    as inventory keeps it; shipping falls back on its own default for a warehouse not named."""


class OrderBackordered(OrderEvent):
    type: Literal["order.backordered"] = "order.backordered"
    lines: tuple[LineQuantity, ...] = Field(min_length=1)
    expected_restock_date: date | None = None
    reason: str


class OrderShipped(OrderEvent):
    type: Literal["order.shipped"] = "order.shipped"
    shipment_id: str
    warehouse_id: str
    carrier: str
    tracking_number: str
    lines: tuple[LineQuantity, ...] = Field(min_length=1)
    ship_by: AwareDatetime
    promised_delivery_at: AwareDatetime


class OrderDelivered(OrderEvent):
    type: Literal["order.delivered"] = "order.delivered"
    shipment_id: str
    lines: tuple[DeliveredLine, ...] = Field(min_length=1)
    delivered_at: AwareDatetime


class OrderDelayed(OrderEvent):
    type: Literal["order.delayed"] = "order.delayed"
    shipment_id: str | None = None
    stage: DelayStage
    reason: str
    new_estimate: AwareDatetime | None = None


class OrderCancelled(OrderEvent):
    type: Literal["order.cancelled"] = "order.cancelled"
    reason: str


AnyOrderEvent = Annotated[
    OrderReceived | OrderAllocated | OrderBackordered | OrderShipped | OrderDelivered | OrderDelayed | OrderCancelled,
    Field(discriminator="type"),
]
"""Any event of the catalogue; parse with ``parse_event``."""

CATALOGUE: dict[str, type[OrderEvent]] = {
    model.event_type(): model
    for model in (
        OrderReceived,
        OrderAllocated,
        OrderBackordered,
        OrderShipped,
        OrderDelivered,
        OrderDelayed,
        OrderCancelled,
    )
}

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}
"""(event type, old schema version) -> function turning that version's data into the next."""

_any_event: TypeAdapter[AnyOrderEvent] = TypeAdapter(AnyOrderEvent)


def parse_event(data: dict[str, Any]) -> OrderEvent:
    """Parse any catalogue event from a dict that carries its ``type``."""
    return _any_event.validate_python(data)


def upcast(event_type: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring data written at an older schema version up to the current one."""
    current = CATALOGUE[event_type].schema_version
    while version < current:
        data = UPCASTERS[(event_type, version)](data)
        version += 1
    return data


def json_schema() -> dict[str, Any]:
    """JSON Schema of every event's data, generated from the models."""
    return _any_event.json_schema(ref_template="#/$defs/{model}")
