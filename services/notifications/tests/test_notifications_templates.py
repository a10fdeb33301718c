"""Every notice renders in en and zh-CN from real order data; a missing or empty
translation falls back to English, never to an empty message."""

from __future__ import annotations

import dataclasses

import pytest
from fulfil.events import LineQuantity, Locale, OrderEvent
from jinja2 import DictLoader, Environment
from notifications import notices
from notifications.domain import NoticeType
from notifications_support import T0, every_notice

FACTS = notices.OrderFacts(
    order_id="o-1",
    external_ref="PO-O-1",
    client="shop-cn",
    service_level="standard",
    lines=[
        {"line_no": 1, "sku": "TEA-001", "qty": 3, "substitutes": ["TEA-002"]},
        {"line_no": 2, "sku": "CUP-010", "qty": 2, "substitutes": []},
    ],
)

EXPECTED: dict[tuple[str, str], list[str]] = {
    ("order.received", "en"): ["received your order PO-O-1", "3 x TEA-001", "10 March 2025"],
    ("order.received", "zh-CN"): ["订单已接收", "TEA-001 × 3", "2025年3月10日"],
    ("order.backordered", "en"): ["backordered", "2 x TEA-001", "8 March 2025", "substitute: TEA-002", "out of stock"],
    ("order.backordered", "zh-CN"): ["延期交货", "预计到货日期：2025年3月8日", "替代商品：TEA-002", "缺货"],
    ("order.shipped", "en"): ["has shipped", "Carrier: SF Express", "Tracking number: SF1234567890", "5 March 2025"],
    ("order.shipped", "zh-CN"): ["已发货", "承运商：SF Express", "运单号：SF1234567890", "承诺送达时间：2025年3月5日"],
    ("order.delayed", "en"): ["is delayed", "in transit", "bad weather", "6 March 2025", "apologise"],
    ("order.delayed", "zh-CN"): ["延误", "运输中", "恶劣天气", "预计到货日期：2025年3月6日", "歉意"],
    ("order.delivered", "en"): ["delivered with damaged items", "1 unit(s) arrived damaged", "1 x CUP-010"],
    ("order.delivered", "zh-CN"): ["已签收", "破损", "CUP-010 × 1"],
    ("order.cancelled", "en"): ["has been cancelled", "you asked us to cancel it"],
    ("order.cancelled", "zh-CN"): ["已取消", "您要求取消订单"],
}


def rendered(event: OrderEvent, locale: str) -> notices.RenderedNotice:
    return notices.render(NoticeType(event.type), locale, lambda loc: notices.notice_context(event, FACTS, loc))


@pytest.mark.parametrize("locale", [Locale.EN, Locale.ZH_CN])
@pytest.mark.parametrize("event", every_notice(), ids=lambda e: e.type)
def test_every_notice_renders_subject_text_and_html_with_real_data(event: OrderEvent, locale: Locale) -> None:
    notice = rendered(event, locale)
    assert notice.locale == locale
    assert notice.subject
    assert "\n" not in notice.subject
    assert "PO-O-1" in notice.subject
    assert "PO-O-1" in notice.text
    assert notice.html.startswith("<html>")
    assert "<strong>PO-O-1</strong>" in notice.html
    whole = f"{notice.subject}\n{notice.text}"
    for fragment in EXPECTED[(event.type, locale)]:
        assert fragment in whole, fragment
    if locale == Locale.ZH_CN:
        assert "order" not in notice.subject.lower()


def test_html_escapes_data_but_text_does_not() -> None:
    event = every_notice()[2].model_copy(update={"carrier": "<b>Fast & Co</b>"})
    notice = rendered(event, Locale.EN)
    assert "Carrier: <b>Fast & Co</b>" in notice.text
    assert "&lt;b&gt;Fast &amp; Co&lt;/b&gt;" in notice.html
    assert "<b>Fast" not in notice.html


def test_delivered_without_damage_has_no_damage_notice() -> None:
    delivered = every_notice()[4]
    assert delivered.type == "order.delivered"
    clean = delivered.model_copy(update={"lines": (delivered.lines[0].model_copy(update={"qty_damaged": 0}),)})  # type: ignore[attr-defined]
    notice = rendered(clean, Locale.ZH_CN)
    assert "破损" not in notice.subject + notice.text
    assert notice.subject == "您的订单 PO-O-1 已签收"


def test_a_locale_without_templates_falls_back_to_english() -> None:
    notice = rendered(every_notice()[0], "fr")
    assert notice.locale == Locale.EN
    assert notice.subject == "We have received your order PO-O-1"


@pytest.mark.parametrize("email_notices", [True, False])
def test_endpoint_disabled_notice_renders_in_both_locales(email_notices: bool) -> None:
    context = {
        "url": "https://hooks.example.com/x",
        "failing_since": T0,
        "error": "HTTP 500",
        "email_notices": email_notices,
    }
    expected = {
        (Locale.EN, True): "Email notices continue as before.",
        (Locale.EN, False): "you chose webhooks only",
        (Locale.ZH_CN, True): "电子邮件通知不受影响",
        (Locale.ZH_CN, False): "您只选择了 Webhook 通知",
    }
    for locale in (Locale.EN, Locale.ZH_CN):
        notice = notices.render(NoticeType.ENDPOINT_DISABLED, locale, lambda _loc: context)
        assert notice.locale == locale
        assert "https://hooks.example.com/x" in notice.text
        assert "HTTP 500" in notice.html
        assert expected[(locale, email_notices)] in notice.text
        assert expected[(locale, email_notices)] in notice.html


SHIP_COMPLETE = {
    Locale.EN: "Your order ships complete, so all of it waits",
    Locale.ZH_CN: "您的订单为整单发货，因此整个订单将等待缺货商品到货后一并发出",
}
SPLIT_SHIPMENT = {
    Locale.EN: "The rest of your order is not held back",
    Locale.ZH_CN: "订单中其余商品不受影响，将照常发货",
}


@pytest.mark.parametrize("locale", [Locale.EN, Locale.ZH_CN])
@pytest.mark.parametrize("allow_partial", [True, False])
def test_backorder_notice_says_what_inventory_does_with_the_rest(locale: Locale, allow_partial: bool) -> None:
    """Ship-complete (allow_partial=false): inventory holds the whole order back until it is covered."""
    backordered = every_notice()[1]
    facts = dataclasses.replace(FACTS, allow_partial=allow_partial)
    notice = notices.render(NoticeType.BACKORDERED, locale, lambda loc: notices.notice_context(backordered, facts, loc))
    said, not_said = (SPLIT_SHIPMENT, SHIP_COMPLETE) if allow_partial else (SHIP_COMPLETE, SPLIT_SHIPMENT)
    for body in (notice.text, notice.html):
        assert said[locale] in body
        assert not_said[locale] not in body
    assert "照常处理" not in notice.text


@pytest.mark.parametrize("locale", [Locale.EN, Locale.ZH_CN])
def test_backorder_of_the_whole_order_says_nothing_about_the_rest(locale: Locale) -> None:
    everything = every_notice()[1].model_copy(
        update={
            "lines": (
                LineQuantity(line_no=1, sku="TEA-001", qty=3),
                LineQuantity(line_no=2, sku="CUP-010", qty=2),
            )
        }
    )
    notice = rendered(everything, locale)
    assert SPLIT_SHIPMENT[locale] not in notice.text
    assert SHIP_COMPLETE[locale] not in notice.text


def test_inventorys_reason_is_said_in_the_customers_language() -> None:
    """Inventory says "insufficient stock: TEA-001"; a zh-CN customer reads Chinese."""
    backordered = every_notice()[1].model_copy(update={"reason": "insufficient stock: TEA-001"})
    assert "原因：部分商品缺货" in rendered(backordered, Locale.ZH_CN).text
    assert "because some items are out of stock" in rendered(backordered, Locale.EN).text


def test_an_empty_or_partial_translation_falls_back_to_english(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Environment(
        loader=DictLoader(
            {
                "en/order.received.jinja": "{% block subject %}Hi {{ external_ref }}{% endblock %}"
                "{% block text %}Text{% endblock %}{% block html %}<p>Html</p>{% endblock %}",
                "zh-CN/order.received.jinja": "{% block subject %}  {% endblock %}"
                "{% block text %}正文{% endblock %}{% block html %}<p>正文</p>{% endblock %}",
                "zh-CN/order.cancelled.jinja": "{% block subject %}已取消{% endblock %}",
            }
        )
    )
    monkeypatch.setattr(notices, "environment", lambda: env)
    notice = notices.render(NoticeType.RECEIVED, Locale.ZH_CN, lambda _loc: {"external_ref": "PO-1"})
    assert (notice.locale, notice.subject, notice.text) == ("en", "Hi PO-1", "Text")
    with pytest.raises(notices.EmptyNotice):
        notices.render(NoticeType.CANCELLED, Locale.ZH_CN, lambda _loc: {})
