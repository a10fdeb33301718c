"""Cohort buckets: which aggregates an order's contribution goes to, and which ones a
window reads. No I/O.

A window is a cohort: the orders whose order.received event time lies in it. Orders
are summed into buckets of their receipt time at three widths, so that a window reads
a few dozen pre-summed buckets instead of every order:

| level | width | written for cohorts | serves |
|---|---|---|---|
| ``1m`` | 1 minute | received within the last 2 h | window ``1h`` |
| ``1h`` | 1 hour | received within the last 25 h + 1 h | window ``24h`` |
| ``6h`` | 6 hours | every cohort inside the settle window | window ``7d``, and ``all`` |
| ``all`` | - | cohorts older than the settle window | window ``all`` |

A window starts on its level's grid: ``1h`` at the start of the minute an hour ago,
``24h`` at the start of the hour 24 hours ago, ``7d`` at the start of the 6-hour block
(00, 06, 12, 18 UTC) seven days ago; so a window covers at most one bucket width more
than its name (1.7 %, 4.2 %, 3.6 %). ``all`` is the ``all`` level plus every ``6h``
bucket. Every change goes to exactly one of those two, so ``all`` is always exact;
old ``6h`` buckets are folded into ``all`` and old ``1m``/``1h`` ones are dropped.

Which levels a change is written to depends on the clock when it is applied. A window
read at time t only reads buckets that every change applied up to t was written to
(writes keep an hour of slack for clocks that disagree).
"""

from __future__ import annotations

from enum import StrEnum

from kpi.domain import Contribution, Parts, difference


class Window(StrEnum):
    HOUR = "1h"
    DAY = "24h"
    WEEK = "7d"
    ALL = "all"


class Level(StrEnum):
    MINUTE = "1m"
    HOUR = "1h"
    QUARTER = "6h"
    SETTLED = "all"


WIDTH_SECONDS = {Level.MINUTE: 60, Level.HOUR: 3600, Level.QUARTER: 6 * 3600}
SPAN_SECONDS = {Window.HOUR: 3600, Window.DAY: 86400, Window.WEEK: 7 * 86400}
LEVEL_OF = {Window.HOUR: Level.MINUTE, Window.DAY: Level.HOUR, Window.WEEK: Level.QUARTER}
SLACK_SECONDS = 3600
"""Fine buckets are written (and kept) an hour longer than their window needs."""

Target = tuple[str, int, str, str]
"""(level, bucket start in seconds since the epoch, dimension, group) of one aggregate."""


def floor_to(seconds: int, width: int) -> int:
    return seconds - seconds % width


def window_start(window: Window, now: int) -> int | None:
    """The first cohort second a window counts (on its level's grid); None for all time."""
    if window is Window.ALL:
        return None
    return floor_to(now - SPAN_SECONDS[window], WIDTH_SECONDS[LEVEL_OF[window]])


def kept_since(level: Level, now: int) -> int:
    """Buckets of a fine level that start before this are no longer written nor read."""
    window = {Level.MINUTE: Window.HOUR, Level.HOUR: Window.DAY}[level]
    start = window_start(window, now)
    assert start is not None
    return start - SLACK_SECONDS


def settled_before(now: int, settle_after: int) -> int:
    """``6h`` buckets that start before this are folded into ``all``: they end before the
    settle window, which is at least the longest rolling window (7 days)."""
    return now - settle_after - WIDTH_SECONDS[Level.QUARTER]


def levels_for(cohort: int, now: int, settle_after: int) -> list[tuple[str, int]]:
    """The (level, bucket start) a change of a cohort is written to at time ``now``."""
    quarter = floor_to(cohort, WIDTH_SECONDS[Level.QUARTER])
    if quarter < settled_before(now, settle_after):
        return [(Level.SETTLED, 0)]
    levels: list[tuple[str, int]] = [(Level.QUARTER, quarter)]
    for level in (Level.HOUR, Level.MINUTE):
        start = floor_to(cohort, WIDTH_SECONDS[level])
        if start >= kept_since(level, now):
            levels.append((level, start))
    return levels


def targets(contribution: Contribution, now: int, settle_after: int) -> list[Target]:
    if contribution.cohort is None or not contribution.parts:
        return []
    scopes = contribution.scopes()
    return [
        (level, start, dimension, group)
        for level, start in levels_for(contribution.cohort, now, settle_after)
        for dimension, group in scopes
    ]


Deltas = dict[Target, Parts]


def _accumulate(deltas: Deltas, target: Target, parts: Parts, sign: int) -> None:
    # The hot loop of applying a batch: zeros are left in and pruned once, by ``pruned``.
    total = deltas.get(target)
    if total is None:
        total = deltas[target] = {}
    for part, counters in parts.items():
        mine = total.get(part)
        if mine is None:
            mine = total[part] = {}
        get = mine.get
        if sign == 1:
            for key, value in counters.items():
                mine[key] = get(key, 0) + value
        else:
            for key, value in counters.items():
                mine[key] = get(key, 0) - value


def add_change(deltas: Deltas, old: Contribution | None, new: Contribution | None, now: int, settle_after: int) -> None:
    """deltas += (what ``new`` adds) - (what ``old`` added), bucket by bucket."""
    old_targets = targets(old, now, settle_after) if old is not None else []
    new_targets = targets(new, now, settle_after) if new is not None else []
    if old_targets == new_targets:  # the usual case: same cohort, same groups
        if new is not None and old is not None and new_targets:
            net = difference(new.parts, old.parts)
            if net:
                for target in new_targets:
                    _accumulate(deltas, target, net, 1)
        return
    common = set(old_targets) & set(new_targets)
    net = difference(new.parts, old.parts) if common and new is not None and old is not None else {}
    for target in old_targets:
        if target not in common:
            assert old is not None
            _accumulate(deltas, target, old.parts, -1)
    for target in new_targets:
        assert new is not None
        if target not in common:
            _accumulate(deltas, target, new.parts, 1)
        elif net:
            _accumulate(deltas, target, net, 1)


def pruned(deltas: Deltas) -> Deltas:
    """The deltas without zero counters and empty parts or targets."""
    out: Deltas = {}
    for target, parts in deltas.items():
        kept = {}
        for part, counters in parts.items():
            nonzero = {key: value for key, value in counters.items() if value}
            if nonzero:
                kept[part] = nonzero
        if kept:
            out[target] = kept
    return out
