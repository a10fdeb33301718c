"""Tables of the order-intake database and the API's request and response schemas."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fulfil.events import CustomerTier, Locale, ServiceLevel
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field as Column_
from sqlmodel import SQLModel

from order_intake import domain
from order_intake.domain import ISO_COUNTRIES, MAX_LINES, SKU_PATTERN, OrderStatus


def _utc_column(*, nullable: bool = False, index: bool = False) -> Any:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything we store is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class IntakeTable(SQLModel, registry=registry()):
    pass


class ApiClient(IntakeTable, table=True):
    """A calling system (ERP, shop). Only the SHA-256 of its random key is stored."""

    __tablename__ = "intake_api_clients"

    id: str = Column_(primary_key=True, max_length=64)
    name: str = Column_(unique=True, max_length=100)
    key_hash: str = Column_(unique=True, max_length=64)
    created_at: datetime = Column_(sa_column=_utc_column())


class Order(IntakeTable, table=True):
    __tablename__ = "intake_orders"
    __table_args__ = (UniqueConstraint("client_id", "external_ref", name="uq_intake_orders_client_external_ref"),)

    order_id: str = Column_(primary_key=True, max_length=64)
    client_id: str = Column_(index=True, max_length=64)
    external_ref: str = Column_(max_length=100)
    customer_id: str = Column_(index=True, max_length=100)
    status: str = Column_(index=True, max_length=32)
    delayed: bool = False
    latest_delay: dict[str, Any] | None = Column_(default=None, sa_column=Column(JSON, nullable=True))
    received_at: datetime = Column_(sa_column=_utc_column(index=True))
    updated_at: datetime = Column_(sa_column=_utc_column())
    cancel_requested_at: datetime | None = Column_(default=None, sa_column=_utc_column(nullable=True))
    """Set once, by a conditional update: two concurrent cancels stage one event."""
    order: dict[str, Any] = Column_(sa_column=Column(JSON, nullable=False))
    """The order.received event data as accepted."""


class TimelineEntry(IntakeTable, table=True):
    """One event that happened to an order, as consumed (the read model)."""

    __tablename__ = "intake_timeline"

    ce_id: str = Column_(primary_key=True, max_length=200)
    order_id: str = Column_(index=True, max_length=64)
    type: str = Column_(max_length=64)
    occurred_at: datetime = Column_(sa_column=_utc_column())
    summary: str
    data: dict[str, Any] = Column_(sa_column=Column(JSON, nullable=False))


class IdempotencyRecord(IntakeTable, table=True):
    """An Idempotency-Key a client used and the response to replay for it.

    Written in the same transaction as the order it answers for, so a key is never
    stored without its effect, nor an effect without its key."""

    __tablename__ = "intake_idempotency_keys"

    client_id: str = Column_(primary_key=True, max_length=64)
    key: str = Column_(primary_key=True, max_length=255)
    request_hash: str = Column_(max_length=64)
    claimed_at: datetime = Column_(sa_column=_utc_column(index=True))
    """When the key was first used; it is forgotten ``idempotency_retention_seconds`` later."""
    status_code: int | None = None
    """None only in rows of an earlier version, which stored a claim before the response."""
    media_type: str | None = Column_(default=None, max_length=100)
    response_body: str | None = None
    location: str | None = Column_(default=None, max_length=300)
    headers: dict[str, str] | None = Column_(default=None, sa_column=Column(JSON, nullable=True))
    """Headers of the response that a replay repeats (Retry-After)."""


# -- API schemas ----------------------------------------------------------------------

NUL_FREE = r"^[^\x00]*$"
"""PostgreSQL cannot store U+0000 in text: refused at the edge, in every string we accept."""


def refuse_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain the NUL character (U+0000)")
    return value


NoNul = AfterValidator(refuse_nul)
NoNulSchema = Field(json_schema_extra={"pattern": NUL_FREE})

Sku = Annotated[
    str,
    StringConstraints(pattern=SKU_PATTERN),
    Field(
        description="2-40 characters: upper-case letters, digits, '.', '_' and '-', starting with a letter or digit",
        examples=["TEA-OOLONG-250G"],
    ),
]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NoNul, NoNulSchema]


def _known_country(value: str) -> str:
    if value not in ISO_COUNTRIES:
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code")
    return value


Country = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Z]{2}$"),
    AfterValidator(_known_country),
    Field(json_schema_extra={"enum": sorted(ISO_COUNTRIES)}),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


EMAIL_PATTERN = r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$"


class CustomerIn(Strict):
    id: Annotated[str, StringConstraints(min_length=1, max_length=100), NoNul, NoNulSchema]
    tier: CustomerTier = CustomerTier.STANDARD
    locale: Locale = Locale.EN
    email: Annotated[str, StringConstraints(pattern=EMAIL_PATTERN, max_length=254)] | None = None
    phone: Annotated[str, StringConstraints(pattern=r"^\+?[0-9 ()-]{5,30}$")] | None = None


class LineIn(Strict):
    line_no: Annotated[int, Field(ge=1, le=100_000, strict=True)]
    sku: Sku
    qty: Annotated[int, Field(ge=1, le=1_000_000, strict=True)]
    substitutes: Annotated[list[Sku], Field(default_factory=list, max_length=20)]
    """SKUs the customer consents to receive instead (替代商品)."""


class AddressIn(Strict):
    name: Text
    line1: Text
    city: Text
    postal_code: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20), NoNul, NoNulSchema
    ]
    country: Annotated[Country, Field(description="ISO 3166-1 alpha-2 code, upper case", examples=["CN"])]


ORDER_ID_EXAMPLE = "ord_5f0c8e3a2b7d4e1f9a6c3b2d1e0f4a5b"
LINKS_EXAMPLE: dict[str, Any] = {
    "self": f"/v1/orders/{ORDER_ID_EXAMPLE}",
    "cancel": f"/v1/orders/{ORDER_ID_EXAMPLE}/cancel",
}


ORDER_EXAMPLE: dict[str, Any] = {
    "external_ref": "SO-2026-000123",
    "customer": {"id": "C-1001", "tier": "core", "locale": "zh-CN", "email": "li.wei@example.cn"},
    "lines": [
        {"line_no": 1, "sku": "TEA-OOLONG-250G", "qty": 4, "substitutes": ["TEA-OOLONG-500G"]},
        {"line_no": 2, "sku": "CUP-CERAMIC-01", "qty": 2},
    ],
    "ship_to": {
        "name": "Li Wei",
        "line1": "88 Century Avenue",
        "city": "Shanghai",
        "postal_code": "200120",
        "country": "CN",
    },
    "placed_at": "2026-11-20T09:30:00Z",
    "requested_delivery_date": "2026-11-25",
    "service_level": "express",
    "allow_partial": True,
}


ACCEPTANCE_CLOCK: ContextVar[Callable[[], datetime]] = ContextVar("acceptance_clock", default=lambda: datetime.now(UTC))
"""The clock placed_at is checked against while a request's body is validated (the app's own)."""

_placed_at = TypeAdapter(AwareDatetime)


class OrderCreate(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [ORDER_EXAMPLE]})

    external_ref: Annotated[str, StringConstraints(min_length=1, max_length=100), NoNul, NoNulSchema]
    """The client's own order number; unique per client."""
    customer: CustomerIn
    lines: Annotated[list[LineIn], Field(min_length=1, max_length=MAX_LINES)]
    ship_to: AddressIn
    placed_at: AwareDatetime | None = None
    """When the customer placed the order; defaults to when we accepted it."""
    requested_delivery_date: date | None = None
    service_level: ServiceLevel = ServiceLevel.STANDARD
    allow_partial: bool = True
    """Ship lines as they become available (true) or only the complete order (false)."""

    @model_validator(mode="wrap")
    @classmethod
    def _every_error_at_once(
        cls, data: Any, handler: ModelWrapValidatorHandler[OrderCreate], info: ValidationInfo
    ) -> OrderCreate:
        """Field errors and the rules spanning fields (line_no unique, placed_at not ahead) in one report.

        ``now`` comes from the validation context (batches) or the app's clock (requests)."""
        order: OrderCreate | None = None
        errors: list[InitErrorDetails] = []
        try:
            order = handler(data)
        except ValidationError as exc:
            # Raised again as they are, type and message, with the rule errors added below.
            errors = [
                InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"])
                for e in exc.errors()
            ]
        now = (info.context or {}).get("now") or ACCEPTANCE_CLOCK.get()()
        if order is not None:
            broken = domain.check_order_rules([line.line_no for line in order.lines], order.placed_at, now)
        else:
            broken = domain.check_order_rules(*_rule_inputs(data), now)
        if not broken:
            if order is None:
                raise ValidationError.from_exception_data(cls.__name__, errors)
            return order
        errors += [
            InitErrorDetails(type=PydanticCustomError(rule.code, rule.detail), loc=rule.location, input=None)
            for rule in broken
        ]
        raise ValidationError.from_exception_data(cls.__name__, errors)


def _rule_inputs(data: Any) -> tuple[list[int | None], datetime | None]:
    """What the cross-field rules need, read from a body that failed field validation."""
    if not isinstance(data, dict):
        return [], None
    lines = data.get("lines")
    line_numbers: list[int | None] = []
    if isinstance(lines, list):
        for line in lines:
            line_no = line.get("line_no") if isinstance(line, dict) else None
            line_numbers.append(line_no if type(line_no) is int else None)
    try:
        placed_at = _placed_at.validate_python(data.get("placed_at"))
    except ValidationError:
        placed_at = None
    return line_numbers, placed_at


class Links(BaseModel):
    self: str
    cancel: str


class OrderAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "order_id": ORDER_ID_EXAMPLE,
                    "external_ref": "SO-2026-000123",
                    "status": "received",
                    "links": LINKS_EXAMPLE,
                }
            ]
        }
    )

    order_id: str
    external_ref: str
    status: OrderStatus
    links: Links


class DelayOut(BaseModel):
    occurred_at: datetime
    stage: str
    reason: str
    new_estimate: datetime | None = None
    shipment_id: str | None = None


class TimelineEntryOut(BaseModel):
    type: str
    occurred_at: datetime
    summary: str
    details: dict[str, Any]
    """The event's data as published."""


class OrderSummary(BaseModel):
    order_id: str
    external_ref: str
    customer_id: str
    status: OrderStatus
    delayed: bool
    received_at: datetime
    updated_at: datetime
    links: Links


class OrderDetail(OrderSummary):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "order_id": ORDER_ID_EXAMPLE,
                    "external_ref": "SO-2026-000123",
                    "customer_id": "C-1001",
                    "status": "partially_shipped",
                    "delayed": True,
                    "latest_delay": {
                        "occurred_at": "2026-11-22T08:00:00Z",
                        "stage": "transit",
                        "reason": "typhoon closed the port",
                        "new_estimate": "2026-11-27T18:00:00Z",
                        "shipment_id": "SH-1",
                    },
                    "received_at": "2026-11-20T09:30:02Z",
                    "updated_at": "2026-11-22T08:00:01Z",
                    "links": LINKS_EXAMPLE,
                    "order": ORDER_EXAMPLE,
                    "timeline": [
                        {
                            "type": "order.received",
                            "occurred_at": "2026-11-20T09:30:02Z",
                            "summary": "Order SO-2026-000123 received: 2 line(s), 6 units",
                            "details": {},
                        }
                    ],
                }
            ]
        }
    )

    latest_delay: DelayOut | None = None
    order: dict[str, Any]
    """The order as accepted (the order.received event data)."""
    timeline: list[TimelineEntryOut]


class OrderPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "order_id": ORDER_ID_EXAMPLE,
                            "external_ref": "SO-2026-000123",
                            "customer_id": "C-1001",
                            "status": "allocated",
                            "delayed": False,
                            "received_at": "2026-11-20T09:30:02Z",
                            "updated_at": "2026-11-20T09:31:15Z",
                            "links": LINKS_EXAMPLE,
                        }
                    ],
                    "next_cursor": "WyIyMDI2LTExLTIwVDA5OjMwOjAyKzAwOjAwIiwib3JkXzVmMGM4ZTNhIl0",
                }
            ]
        }
    )

    items: list[OrderSummary]
    next_cursor: str | None = None
    """Pass as ``cursor`` to get the next page; absent on the last page."""


class CancelRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "customer changed mind"}]})

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500), NoNul, NoNulSchema]


class CancelAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"order_id": ORDER_ID_EXAMPLE, "status": "cancelled", "links": LINKS_EXAMPLE}]}
    )

    order_id: str
    status: OrderStatus
    links: Links


class BatchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"orders": [ORDER_EXAMPLE]}]})

    orders: Annotated[list[Any], Field(min_length=1, max_length=1000)]
    """Up to 1,000 orders, each shaped like the body of POST /v1/orders; each is validated on its own."""


class ItemError(BaseModel):
    pointer: str
    detail: str
    code: str


class BatchItemResult(BaseModel):
    index: int
    result: str
    """created, duplicate or invalid."""
    order_id: str | None = None
    external_ref: str | None = None
    errors: list[ItemError] = Field(default_factory=list)


class BatchResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "created": 1,
                    "duplicates": 1,
                    "invalid": 1,
                    "items": [
                        {"index": 0, "result": "created", "order_id": "ord_1", "external_ref": "SO-1", "errors": []},
                        {"index": 1, "result": "duplicate", "order_id": "ord_0", "external_ref": "SO-0", "errors": []},
                        {
                            "index": 2,
                            "result": "invalid",
                            "errors": [
                                {
                                    "pointer": "/orders/2/lines/0/qty",
                                    "detail": "Input should be greater than or equal to 1",
                                    "code": "greater_than_equal",
                                }
                            ],
                        },
                    ],
                }
            ]
        }
    )

    created: int
    duplicates: int
    invalid: int
    items: list[BatchItemResult]


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; extra members (errors, order_id) depend on the problem."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
