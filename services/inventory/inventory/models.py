"""Inventory tables (its own registry) and API schemas."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

from fulfil.events import CustomerTier
from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator
from pydantic import Field as PydanticField
from sqlalchemy import JSON, BigInteger, CheckConstraint, Column, DateTime, Index, Integer, UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class InventoryTable(SQLModel, registry=registry()):
    pass


def _aware() -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=False)


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything stored here is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _units() -> Column[int]:
    # 64-bit: repeated receipts of up to 1e9 units each overflow a 32-bit INTEGER on PostgreSQL.
    return Column(BigInteger(), nullable=False, default=0)


MAX_UNITS_PER_STOCK_ROW = 1_000_000_000_000
"""A receipt that would take one warehouse's on_hand of one SKU beyond this is refused (409)."""


def _autoincrement_id() -> Column[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
    return Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)


class WarehouseRow(InventoryTable, table=True):
    __tablename__ = "warehouses"

    warehouse_id: str = Field(primary_key=True, max_length=64)
    name: str
    country: str = Field(max_length=2)
    regions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    handling_hours: int
    priority: int


class StockRow(InventoryTable, table=True):
    """On hand, reserved for orders (of which reserved_for_core by core orders), and the
    reserve held for core customers."""

    __tablename__ = "stock"
    __table_args__ = (
        CheckConstraint("reserved >= 0 AND reserved <= on_hand", name="ck_stock_reserved_within_on_hand"),
        CheckConstraint(
            "reserved_for_core >= 0 AND reserved_for_core <= reserved", name="ck_stock_core_within_reserved"
        ),
        CheckConstraint("protected_for_core >= 0", name="ck_stock_protected_not_negative"),
    )

    warehouse_id: str = Field(primary_key=True, max_length=64)
    sku: str = Field(primary_key=True, max_length=64)
    on_hand: int = Field(default=0, sa_column=_units())
    reserved: int = Field(default=0, sa_column=_units())
    protected_for_core: int = Field(default=0, sa_column=_units())
    reserved_for_core: int = Field(default=0, sa_column=_units())


class InventoryOrder(InventoryTable, table=True):
    """What inventory remembers of an order: enough to serve it from the backorder queue."""

    __tablename__ = "orders"

    order_id: str = Field(primary_key=True, max_length=64)
    tier: CustomerTier
    allow_partial: bool
    placed_at: datetime = Field(sa_column=_aware())
    received_at: datetime = Field(sa_column=_aware())
    cancelled: bool = False


class Reservation(InventoryTable, table=True):
    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_order", "order_id", "line_no"),)

    id: int | None = Field(default=None, sa_column=_autoincrement_id())
    order_id: str = Field(max_length=64)
    line_no: int
    sku: str = Field(max_length=64)
    warehouse_id: str = Field(max_length=64)
    qty: int
    substitute_for: str | None = None


class Backorder(InventoryTable, table=True):
    """A line (or the rest of one) waiting for stock; served core first, then oldest order."""

    __tablename__ = "backorders"
    __table_args__ = (UniqueConstraint("order_id", "line_no", name="uq_backorders_line"),)

    id: int | None = Field(default=None, sa_column=_autoincrement_id())
    order_id: str = Field(max_length=64, index=True)
    line_no: int
    sku: str = Field(max_length=64, index=True)
    substitutes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    qty: int
    tier: CustomerTier
    allow_partial: bool
    placed_at: datetime = Field(sa_column=_aware())


class BackorderSku(InventoryTable, table=True):
    """Every SKU that may fill a waiting line (the ordered one and its consented
    substitutes), so the lines a restock of a SKU can serve are found by index."""

    __tablename__ = "backorder_skus"
    __table_args__ = (Index("ix_backorder_skus_sku_tier", "sku", "tier"),)

    order_id: str = Field(primary_key=True, max_length=64)
    line_no: int = Field(primary_key=True)
    sku: str = Field(primary_key=True, max_length=64)
    tier: CustomerTier


class Receipt(InventoryTable, table=True):
    __tablename__ = "receipts"

    receipt_id: str = Field(primary_key=True, max_length=64)
    warehouse_id: str = Field(max_length=64)
    lines: list[dict[str, object]] = Field(sa_column=Column(JSON, nullable=False))
    received_at: datetime = Field(sa_column=_aware())
    orders_served: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class InboundRow(InventoryTable, table=True):
    __tablename__ = "inbound"

    warehouse_id: str = Field(primary_key=True, max_length=64)
    sku: str = Field(primary_key=True, max_length=64)
    qty: int = Field(sa_column=_units())
    eta: date


# -- API schemas ------------------------------------------------------------------------

Sku = Annotated[str, PydanticField(min_length=1, max_length=64)]
Units = Annotated[int, PydanticField(ge=0, le=1_000_000_000, strict=True)]
PositiveUnits = Annotated[int, PydanticField(ge=1, le=1_000_000_000, strict=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WarehouseIn(Strict):
    name: str = PydanticField(min_length=1, max_length=200)
    country: str = PydanticField(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")
    regions: list[str] = PydanticField(default_factory=list, max_length=500)
    handling_hours: int = PydanticField(ge=0, le=24 * 30, description="ship-by SLA after allocation")
    priority: int = PydanticField(ge=0, le=1_000_000, description="lower is preferred")


class WarehouseOut(WarehouseIn):
    warehouse_id: str


class StockIn(Strict):
    on_hand: Units
    protected_for_core: Units = 0

    @model_validator(mode="after")
    def _protected_within_on_hand(self) -> StockIn:
        if self.protected_for_core > self.on_hand:
            raise ValueError("protected_for_core cannot exceed on_hand")
        return self


class StockOut(BaseModel):
    warehouse_id: str
    sku: str
    on_hand: int
    reserved: int
    available: int = PydanticField(description="on_hand - reserved (core customers may take all of it)")
    available_to_standard: int = PydanticField(
        description="available minus the part of the core reserve that core orders have not taken yet"
    )
    protected_for_core: int = PydanticField(description="units held for core customers (the core reserve)")
    reserved_for_core: int = PydanticField(description="of reserved, the units core orders hold")


class ReceiptLine(Strict):
    sku: Sku
    qty: PositiveUnits


class ReceiptIn(Strict):
    receipt_id: str = PydanticField(min_length=1, max_length=64)
    warehouse_id: str = PydanticField(min_length=1, max_length=64)
    lines: list[ReceiptLine] = PydanticField(min_length=1, max_length=1000)
    received_at: AwareDatetime | None = None


class ReceiptOut(BaseModel):
    receipt_id: str
    warehouse_id: str
    lines: list[ReceiptLine]
    received_at: datetime
    orders_served: list[str]


class InboundIn(Strict):
    qty: Units
    eta: date


class InboundOut(InboundIn):
    warehouse_id: str
    sku: str


class BackorderOut(BaseModel):
    position: int
    order_id: str
    line_no: int
    sku: str
    qty: int
    substitutes: list[str]
    customer_tier: CustomerTier
    allow_partial: bool
    placed_at: datetime
    expected_restock_date: date | None = PydanticField(description="when known inbound purchases reach this line")
