"""Rendering notices from Jinja2 templates: one file per notice type and locale, each
with ``subject``, ``text`` and ``html`` blocks. A missing or empty translation falls
back to English; a notice is never sent empty."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from typing import Any

from fulfil.events import (
    DelayStage,
    Locale,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from jinja2 import Environment, PackageLoader, StrictUndefined, TemplateNotFound, pass_context
from jinja2.runtime import Context

from notifications.domain import NoticeType

FALLBACK_LOCALE = Locale.EN
BLOCKS = ("subject", "text", "html")


class EmptyNotice(RuntimeError):
    """Not even the English template produced a message."""


@dataclass(frozen=True)
class RenderedNotice:
    locale: str
    """The locale actually used (after any fallback)."""
    subject: str
    text: str
    html: str


STAGE_WORDS: dict[str, dict[str, str]] = {
    Locale.EN: {
        DelayStage.DISPATCH: "leaving our warehouse",
        DelayStage.TRANSIT: "in transit",
        DelayStage.CARRIER_EXCEPTION: "with the carrier",
    },
    Locale.ZH_CN: {
        DelayStage.DISPATCH: "仓库出库",
        DelayStage.TRANSIT: "运输中",
        DelayStage.CARRIER_EXCEPTION: "承运商处理中",
    },
}

REASON_WORDS: dict[str, dict[str, str]] = {
    Locale.EN: {
        "missed_ship_by": "it could not leave the warehouse by the promised time",
        "missed_promised_delivery": "the carrier could not deliver it by the promised time",
        "carrier_exception": "the carrier reported a problem with the shipment",
        "weather": "bad weather is slowing transport",
        "address_issue": "the carrier could not confirm the delivery address",
        "out_of_stock": "some items are out of stock",
        "insufficient_stock": "some items are out of stock",
        "customer_request": "you asked us to cancel it",
        "client_request": "the shop asked us to cancel it",
    },
    Locale.ZH_CN: {
        "missed_ship_by": "未能在承诺时间内从仓库发出",
        "missed_promised_delivery": "承运商未能在承诺送达时间内送达",
        "carrier_exception": "承运商报告该运单出现异常",
        "weather": "恶劣天气影响了运输",
        "address_issue": "承运商无法确认收货地址",
        "out_of_stock": "部分商品缺货",
        "insufficient_stock": "部分商品缺货",
        "customer_request": "您要求取消订单",
        "client_request": "商家要求取消订单",
    },
}


def plain_words(table: dict[str, dict[str, str]], code: str, locale: str) -> str:
    """A reason or stage code said in plain words; unknown codes are shown readably, never blank.

    A code with a detail after a colon ("insufficient stock: TEA-001") is looked up by its
    head, so the customer reads their own language, not our log line."""
    for key in (code, code.partition(":")[0].strip().replace(" ", "_")):
        words = table.get(locale, {}).get(key) or table[FALLBACK_LOCALE].get(key)
        if words:
            return words
    return code.replace("_", " ").strip() or code


@pass_context
def _format_date(context: Context, value: date | datetime | None) -> str:
    if value is None:
        return ""
    locale = context.get("locale", FALLBACK_LOCALE)
    if locale == Locale.ZH_CN:
        text = f"{value.year}年{value.month}月{value.day}日"
        return text + (f" {value:%H:%M} (UTC)" if isinstance(value, datetime) else "")
    text = f"{value.day} {value:%B %Y}"
    return text + (f", {value:%H:%M} UTC" if isinstance(value, datetime) else "")


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("notifications", "templates"),
        undefined=StrictUndefined,
        autoescape=False,  # the html block switches escaping on for itself
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["date"] = _format_date
    return env


def render(notice: NoticeType, locale: str, context_for: Callable[[str], dict[str, Any]]) -> RenderedNotice:
    """Render a notice in the customer's locale, or in English when that translation is
    missing or comes out empty. ``context_for(locale)`` gives the template variables."""
    tried = [locale] if locale == FALLBACK_LOCALE else [locale, FALLBACK_LOCALE]
    for candidate in tried:
        pieces = _render_blocks(notice, candidate, {**context_for(candidate), "locale": candidate})
        if pieces is not None:
            return RenderedNotice(candidate, *pieces)
    raise EmptyNotice(f"no template renders {notice} (tried {tried})")


def _render_blocks(notice: NoticeType, locale: str, context: dict[str, Any]) -> tuple[str, str, str] | None:
    try:
        template = environment().get_template(f"{locale}/{notice.value}.jinja")
    except TemplateNotFound:
        return None
    pieces = []
    for block in BLOCKS:
        if block not in template.blocks:
            return None
        text = "".join(template.blocks[block](template.new_context(context))).strip()
        if not text:
            return None
        pieces.append(text)
    subject, body, html = pieces
    return " ".join(subject.split()), body, html


# -- what each notice is rendered from ---------------------------------------------------


@dataclass(frozen=True)
class OrderFacts:
    """What this service copied from order.received."""

    order_id: str
    external_ref: str
    client: str
    service_level: str
    lines: list[dict[str, Any]]
    allow_partial: bool = True
    """False: ship-complete, so the rest of the order waits for what is backordered."""


def notice_context(event: OrderEvent, order: OrderFacts, locale: str) -> dict[str, Any]:
    """Template variables for an order event, from the event and the copied order."""
    context: dict[str, Any] = {
        "order_id": event.order_id,
        "external_ref": order.external_ref,
        "client": order.client,
        "service_level": order.service_level,
        "occurred_at": event.occurred_at,
    }
    if isinstance(event, OrderReceived):
        context.update(
            lines=[line.model_dump() for line in event.lines],
            placed_at=event.placed_at,
            requested_delivery_date=event.requested_delivery_date,
        )
    elif isinstance(event, OrderBackordered):
        ordered = {line["line_no"]: line for line in order.lines}
        substitutes = {
            line.line_no: list(ordered.get(line.line_no, {}).get("substitutes") or []) for line in event.lines
        }
        context.update(
            lines=[line.model_dump() for line in event.lines],
            expected_restock_date=event.expected_restock_date,
            reason=plain_words(REASON_WORDS, event.reason, locale),
            substitutes={no: skus for no, skus in substitutes.items() if skus},
            allow_partial=order.allow_partial,
            partly_available=_units(order.lines) > sum(line.qty for line in event.lines),
        )
    elif isinstance(event, OrderShipped):
        context.update(
            carrier=event.carrier,
            tracking_number=event.tracking_number,
            promised_delivery_at=event.promised_delivery_at,
            lines=[line.model_dump() for line in event.lines],
        )
    elif isinstance(event, OrderDelayed):
        context.update(
            stage=plain_words(STAGE_WORDS, event.stage, locale),
            reason=plain_words(REASON_WORDS, event.reason, locale),
            new_estimate=event.new_estimate,
        )
    elif isinstance(event, OrderDelivered):
        context.update(
            delivered_at=event.delivered_at,
            lines=[line.model_dump() for line in event.lines],
            damaged_lines=[line.model_dump() for line in event.lines if line.qty_damaged > 0],
            damaged_units=sum(line.qty_damaged for line in event.lines),
        )
    elif isinstance(event, OrderCancelled):
        context.update(reason=plain_words(REASON_WORDS, event.reason, locale))
    return context


def _units(lines: list[dict[str, Any]]) -> int:
    return sum(int(line.get("qty", 0)) for line in lines)


def webhook_payload(notice: NoticeType, occurred_at: datetime, data: dict[str, Any]) -> str:
    """The Standard Webhooks body: ``{type, timestamp, data}``, serialised once."""
    body = {"type": notice.value, "timestamp": occurred_at.isoformat(), "data": data}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)
