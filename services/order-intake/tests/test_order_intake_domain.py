"""Unit tests of order-intake's pure rules: status derivation, validation rules, token bucket."""

from __future__ import annotations

import random

import pytest
from fulfil.events import OrderEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from intake_events import (
    T0,
    allocated,
    at,
    backordered,
    cancelled,
    delayed,
    delivered,
    full_life,
    received,
    shipped,
)
from order_intake.domain import OrderStatus, TokenBucket, check_order_rules, derive_state, summarize


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([received("o", 0)], OrderStatus.RECEIVED),
        ([received("o", 0), backordered("o", 1)], OrderStatus.BACKORDERED),
        ([received("o", 0), allocated("o", 1, 1, 5), backordered("o", 1)], OrderStatus.PARTIALLY_ALLOCATED),
        ([received("o", 0), allocated("o", 1, 1, 5), allocated("o", 2, 2, 3)], OrderStatus.ALLOCATED),
        ([received("o", 0), allocated("o", 1, 1, 5, complete=True)], OrderStatus.ALLOCATED),
        ([received("o", 0), shipped("o", 5, "S1", {1: 5})], OrderStatus.PARTIALLY_SHIPPED),
        ([received("o", 0), shipped("o", 5, "S1", {1: 5, 2: 3})], OrderStatus.SHIPPED),
        ([received("o", 0), shipped("o", 5, "S1", {1: 5, 2: 3}), delivered("o", 9, "S1")], OrderStatus.DELIVERED),
        ([received("o", 0), allocated("o", 1, 1, 5), cancelled("o", 3)], OrderStatus.CANCELLED),
        # Cancelled after a partial shipment: the rest is cancelled.
        ([received("o", 0), shipped("o", 2, "S1", {1: 5}), cancelled("o", 3)], OrderStatus.CANCELLED),
        # A cancel that lost the race against the last shipment does not undo what shipped.
        ([received("o", 0), shipped("o", 2, "S1", {1: 5, 2: 3}), cancelled("o", 3)], OrderStatus.SHIPPED),
        # Delivery of one of two shipments is not delivery of the order.
        (
            [received("o", 0), shipped("o", 2, "S1", {1: 5}), shipped("o", 3, "S2", {2: 3}), delivered("o", 4, "S1")],
            OrderStatus.SHIPPED,
        ),
        (full_life("o"), OrderStatus.DELIVERED),
    ],
)
def test_status_follows_what_happened(events: list[OrderEvent], status: OrderStatus) -> None:
    assert derive_state(events).status is status


def test_delay_flag_carries_the_latest_delay_until_delivery() -> None:
    events = [
        received("o", 0),
        shipped("o", 1, "S1", {1: 5, 2: 3}),
        delayed("o", 50, "typhoon"),
        delayed("o", 9, "fog"),
    ]
    state = derive_state(events)
    assert state.delayed
    assert state.latest_delay is not None
    assert state.latest_delay.reason == "typhoon"
    assert state.latest_delay.occurred_at == at(50)
    done = derive_state([*events, delivered("o", 60, "S1")])
    assert not done.delayed
    assert done.status is OrderStatus.DELIVERED
    assert done.latest_delay is not None  # the history stays visible


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_status_does_not_depend_on_arrival_order(rng: random.Random) -> None:
    events = full_life("o")[:7]  # received .. delayed twice, one shipment out: not yet delivered
    expected = derive_state(events)
    shuffled = events[:]
    rng.shuffle(shuffled)
    assert derive_state(shuffled) == expected
    assert expected.status is OrderStatus.PARTIALLY_SHIPPED
    assert expected.delayed


def test_every_event_type_has_a_readable_summary() -> None:
    summaries = {event.type: summarize(event) for event in [*full_life("o"), cancelled("o", 1)]}
    assert len(summaries) == 7
    assert "SF Express" in summaries["order.shipped"]
    assert "TRK-S" in summaries["order.shipped"]
    assert "new estimate" in summaries["order.delayed"]
    assert "out of stock" in summaries["order.backordered"]
    assert "WH-1" in summaries["order.allocated"]


def test_order_rules_name_every_duplicate_line_and_a_future_placed_at() -> None:
    errors = check_order_rules([1, 2, 1, 2], at(6), now=T0)
    assert [(e.pointer, e.code) for e in errors] == [
        ("/lines/2/line_no", "duplicate_line_no"),
        ("/lines/3/line_no", "duplicate_line_no"),
        ("/placed_at", "placed_at_in_future"),
    ]
    assert check_order_rules([1, 2], at(5), now=T0) == []
    # A line whose own line_no is invalid (None) takes no part in the rule, but keeps its index.
    assert [e.location for e in check_order_rules([7, None, 7], None, now=T0)] == [("lines", 2, "line_no")]


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket.full(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0
    assert bucket.take(0.5) > 0
    assert bucket.take(100) == 0  # refills, but never beyond the burst
    assert bucket.tokens == 2
