"""Pure rules: retry schedule, response classes, quiet hours, where a webhook may go."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from fulfil.events import ServiceLevel
from notifications.config import Settings
from notifications.domain import (
    MAX_ATTEMPTS,
    RETRY_SCHEDULE,
    NoticeType,
    OutcomeKind,
    QuietHours,
    address_refusal,
    classify_response,
    endpoint_should_be_disabled,
    next_attempt_at,
    parse_retry_after,
    release_at,
    retry_delay,
    retry_span,
    webhook_url_problem,
)
from notifications.notices import REASON_WORDS, plain_words

NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
CAP = timedelta(hours=24)


def test_schedule_is_immediate_then_backs_off_over_about_three_days_then_stops() -> None:
    delays = [retry_delay(n) for n in range(MAX_ATTEMPTS)]
    assert delays == list(RETRY_SCHEDULE)
    assert delays[:8] == [
        timedelta(0),
        timedelta(seconds=5),
        timedelta(minutes=5),
        timedelta(minutes=30),
        timedelta(hours=2),
        timedelta(hours=5),
        timedelta(hours=10),
        timedelta(hours=24),
    ]
    assert retry_delay(MAX_ATTEMPTS) is None
    # From the first attempt to the last: about three days, and still well over two with jitter.
    assert timedelta(hours=70) < retry_span() <= timedelta(hours=72)
    assert retry_span(jitter=-1.0) > timedelta(days=2.5)
    assert retry_span(jitter=1.0) < timedelta(days=3.5)


def test_default_disable_threshold_is_reached_within_one_deliverys_attempts() -> None:
    """A single failing delivery must live long enough to trigger the endpoint switch-off."""
    threshold = timedelta(seconds=Settings().endpoint_disable_after_seconds)
    assert threshold <= retry_span(jitter=-1.0)
    with pytest.raises(ValueError, match="longer than the retry schedule"):
        Settings(endpoint_disable_after_seconds=4 * 86_400)
    with pytest.raises(ValueError, match="must outlast an attempt"):
        Settings(delivery_lease_seconds=10)


@pytest.mark.parametrize(
    ("reason", "locale", "words"),
    [
        # What shipping's delay scan and carrier exceptions put in order.delayed (code: detail).
        ("missed_ship_by: not dispatched by 2026-12-04T10:00:00+00:00, 2.0 h late", "en",
         "it could not leave the warehouse by the promised time"),
        ("missed_promised_delivery: still late; not delivered by 2026-12-04T10:00:00+00:00, 30.0 h late", "zh-CN",
         "承运商未能在承诺送达时间内送达"),
        ("weather: still late; storm over the Alps", "zh-CN", "恶劣天气影响了运输"),
        ("address_issue", "en", "the carrier could not confirm the delivery address"),
    ],
)  # fmt: skip
def test_delay_reasons_from_shipping_are_told_in_plain_words(reason: str, locale: str, words: str) -> None:
    assert plain_words(REASON_WORDS, reason, locale) == words


def test_plain_words_reads_a_code_with_a_detail_by_its_head() -> None:
    assert plain_words(REASON_WORDS, "insufficient stock: TEA-001, CUP-010", "zh-CN") == "部分商品缺货"
    assert plain_words(REASON_WORDS, "weather", "en") == "bad weather is slowing transport"
    assert plain_words(REASON_WORDS, "road_closed", "zh-CN") == "road closed"


@pytest.mark.parametrize("jitter", [-1.0, -0.3, 0.5, 1.0, 7.0])
def test_jitter_stays_within_ten_percent(jitter: float) -> None:
    delay = retry_delay(4, jitter)
    assert delay is not None
    assert timedelta(hours=1.8) <= delay <= timedelta(hours=2.2)


def test_retry_after_wins_over_the_schedule_within_a_cap() -> None:
    assert next_attempt_at(NOW, 1, jitter=0, retry_after=None, retry_after_cap=CAP) == NOW + timedelta(seconds=5)
    assert next_attempt_at(NOW, 1, jitter=0, retry_after=timedelta(seconds=90), retry_after_cap=CAP) == NOW + timedelta(
        seconds=90
    )
    assert next_attempt_at(NOW, 1, jitter=0, retry_after=timedelta(days=9), retry_after_cap=CAP) == NOW + CAP
    assert next_attempt_at(NOW, MAX_ATTEMPTS, jitter=0, retry_after=timedelta(1), retry_after_cap=CAP) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, OutcomeKind.DELIVERED),
        (204, OutcomeKind.DELIVERED),
        (301, OutcomeKind.GIVE_UP),
        (400, OutcomeKind.GIVE_UP),
        (404, OutcomeKind.GIVE_UP),
        (410, OutcomeKind.DISABLE_ENDPOINT),
        (429, OutcomeKind.RETRY),
        (500, OutcomeKind.RETRY),
        (502, OutcomeKind.RETRY),
        (503, OutcomeKind.RETRY),
        (504, OutcomeKind.RETRY),
    ],
)
def test_only_2xx_succeeds_410_disables_other_4xx_give_up(status: int, kind: OutcomeKind) -> None:
    assert classify_response(status, None, NOW).kind is kind


def test_retry_after_is_read_for_429_and_503_only() -> None:
    assert classify_response(429, "120", NOW).retry_after == timedelta(seconds=120)
    assert classify_response(503, "Mon, 03 Mar 2025 12:05:00 GMT", NOW).retry_after == timedelta(minutes=5)
    assert classify_response(500, "120", NOW).retry_after is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("Mon, 03 Mar 2025 11:00:00 GMT", NOW) == timedelta(0)


def test_endpoint_is_disabled_once_it_has_failed_for_the_threshold() -> None:
    threshold = timedelta(hours=3)
    assert not endpoint_should_be_disabled(None, NOW, threshold)
    assert not endpoint_should_be_disabled(NOW - timedelta(hours=2, minutes=59), NOW, threshold)
    assert endpoint_should_be_disabled(NOW - threshold, NOW, threshold)


QUIET = QuietHours(time(22, 0), time(7, 0), "Asia/Shanghai")


def test_delay_notice_in_quiet_hours_waits_for_the_morning() -> None:
    late_evening = datetime(2025, 3, 3, 15, 30, tzinfo=UTC)  # 23:30 in Shanghai
    morning = datetime(2025, 3, 3, 23, 0, tzinfo=UTC)  # 07:00 next day in Shanghai
    assert release_at(NoticeType.DELAYED, late_evening, QUIET, ServiceLevel.STANDARD) == morning
    small_hours = datetime(2025, 3, 3, 19, 0, tzinfo=UTC)  # 03:00 in Shanghai
    assert release_at(NoticeType.DELAYED, small_hours, QUIET, ServiceLevel.STANDARD) == morning


def test_express_orders_other_notices_and_daytime_are_sent_at_once() -> None:
    late_evening = datetime(2025, 3, 3, 15, 30, tzinfo=UTC)
    assert release_at(NoticeType.DELAYED, late_evening, QUIET, ServiceLevel.EXPRESS) == late_evening
    assert release_at(NoticeType.SHIPPED, late_evening, QUIET, ServiceLevel.STANDARD) == late_evening
    assert release_at(NoticeType.DELAYED, late_evening, None, ServiceLevel.STANDARD) == late_evening
    afternoon = datetime(2025, 3, 3, 6, 0, tzinfo=UTC)  # 14:00 in Shanghai
    assert release_at(NoticeType.DELAYED, afternoon, QUIET, ServiceLevel.STANDARD) == afternoon
    same_day = QuietHours(time(1, 0), time(6, 0))
    night = datetime(2025, 3, 3, 2, 0, tzinfo=UTC)
    assert release_at(NoticeType.DELAYED, night, same_day, ServiceLevel.ECONOMY) == datetime(
        2025, 3, 3, 6, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "fe80::1",
     "::ffff:127.0.0.1", "::ffff:8.8.8.8", "0.0.0.0", "fc00::5", "100.64.0.1", "224.0.0.1"],
)  # fmt: skip
def test_addresses_a_webhook_may_never_reach(address: str) -> None:
    assert address_refusal(address, allow_loopback=False) is not None


def test_loopback_allowance_covers_plain_loopback_only() -> None:
    assert address_refusal("127.0.0.1", allow_loopback=True) is None
    assert address_refusal("::1", allow_loopback=True) is None
    assert address_refusal("::ffff:127.0.0.1", allow_loopback=True) is not None
    assert address_refusal("10.0.0.1", allow_loopback=True) is not None
    assert address_refusal("93.184.215.14", allow_loopback=False) is None
    assert address_refusal("2606:4700::1111", allow_loopback=False) is None


@pytest.mark.parametrize(
    ("url", "allow_loopback", "refused"),
    [
        ("https://hooks.example.com/fulfil", False, False),
        ("http://hooks.example.com/fulfil", False, True),
        ("http://hooks.example.com/fulfil", True, True),
        ("http://127.0.0.1:9000/x", True, False),
        ("http://localhost:9000/x", True, False),
        ("http://127.0.0.1:9000/x", False, True),
        ("https://127.0.0.1/x", False, True),
        ("https://169.254.169.254/latest/meta-data", True, True),
        ("https://10.0.0.8/x", True, True),
        ("https://[::1]/x", False, True),
        ("https://[::ffff:169.254.169.254]/x", True, True),
        ("ftp://hooks.example.com/", True, True),
        ("https://user:pw@hooks.example.com/", False, True),
        ("https:///nohost", False, True),
    ],
)
def test_webhook_urls_at_registration(url: str, allow_loopback: bool, refused: bool) -> None:
    assert (webhook_url_problem(url, allow_loopback=allow_loopback) is not None) is refused
