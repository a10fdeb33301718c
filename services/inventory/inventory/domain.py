"""Allocation rules (履行订单的能力), pure: no I/O, no clock.

- Prefer one warehouse that covers every line; among several, warehouse priority (lower
  first), then most stock of the order's SKUs; otherwise the fewest warehouses that cover
  the order (分批运送, split shipment). When nothing covers it, the fewest warehouses that
  give the most units: never a split that adds no unit.
- A line is filled from its ordered SKU; only when that SKU is short (all warehouses
  together cannot cover the demand for it) may the line take a consented substitute
  (替代商品, only with consent), and never anything else. Substitutes are assigned so that
  as many units as possible are filled, the customer's order of preference first.
- protected_for_core units are held for core customers (核心客户): units core orders hold
  count toward them; standard customers may take only what lies beyond them.
- What cannot be covered now is backordered (延期交货) with the truest date we know.
- The backorder queue is served strictly in order: core customers first, then the oldest
  order. Each waiting order takes what is free to it; a ship-complete order holds what it
  took, unannounced, until it is complete, so nothing behind it can starve it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from itertools import combinations

from fulfil.events import (
    AllocatedLine,
    CustomerTier,
    LineQuantity,
    OrderAllocated,
    OrderBackordered,
    OrderEvent,
    OrderReceived,
)

DEFAULT_PRIORITY = 1_000
"""Priority of a warehouse that holds stock but was never described (served last)."""
MAX_EXACT_WAREHOUSES = 8
"""Up to this many warehouses the fewest-warehouse search is exhaustive (2**8 subsets);
beyond, warehouses are added greedily (most units gained first)."""

StockKey = tuple[str, str]
"""(warehouse_id, sku)"""


@dataclass(frozen=True)
class StockLevel:
    warehouse_id: str
    sku: str
    on_hand: int
    reserved: int = 0
    protected_for_core: int = 0
    reserved_for_core: int = 0
    """Of ``reserved``, the units core orders hold."""

    @property
    def key(self) -> StockKey:
        return (self.warehouse_id, self.sku)

    @property
    def available(self) -> int:
        """Free units for anyone who may take protected stock: on_hand = available + reserved."""
        return max(0, self.on_hand - self.reserved)

    @property
    def protected_left(self) -> int:
        """Units of the core reserve that core orders have not taken yet."""
        return max(0, self.protected_for_core - self.reserved_for_core)

    def available_to(self, tier: CustomerTier) -> int:
        if tier is CustomerTier.CORE:
            return self.available
        return max(0, self.on_hand - self.reserved - self.protected_left)

    def reserve(self, qty: int, tier: CustomerTier) -> StockLevel:
        core = qty if tier is CustomerTier.CORE else 0
        return replace(self, reserved=self.reserved + qty, reserved_for_core=self.reserved_for_core + core)


@dataclass(frozen=True)
class Warehouse:
    warehouse_id: str
    priority: int = DEFAULT_PRIORITY
    handling_hours: int | None = None
    """Ship-by SLA after allocation; None when not known (shipping then uses its default)."""


def handling_of(allocations: Iterable[AllocatedLine], warehouses: Iterable[Warehouse]) -> dict[str, int]:
    """The known handling hours of the warehouses these allocations take units from."""
    used = {a.warehouse_id for a in allocations}
    return {
        w.warehouse_id: w.handling_hours for w in warehouses if w.warehouse_id in used and w.handling_hours is not None
    }


@dataclass(frozen=True)
class Inbound:
    """An expected purchase arrival."""

    warehouse_id: str
    sku: str
    qty: int
    eta: date


@dataclass(frozen=True)
class Demand:
    """A line (or the rest of a line) still to be covered."""

    line_no: int
    sku: str
    qty: int
    substitutes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    allocations: tuple[AllocatedLine, ...]
    shortfalls: tuple[LineQuantity, ...]

    @property
    def complete(self) -> bool:
        return not self.shortfalls

    @property
    def units(self) -> int:
        return sum(a.qty for a in self.allocations)

    def warehouses(self) -> set[str]:
        return {a.warehouse_id for a in self.allocations}


def demands_of(order: OrderReceived) -> list[Demand]:
    return [Demand(line.line_no, line.sku, line.qty, tuple(line.substitutes)) for line in order.lines]


def plan_allocation(
    demands: Sequence[Demand],
    tier: CustomerTier,
    stock: Iterable[StockLevel],
    warehouses: Iterable[Warehouse] = (),
) -> Plan:
    """Which units of which warehouses cover the demands, and what stays short: the most
    units there are, from the fewest warehouses, the best-ranked first."""
    ordered = Counter[str]()
    for demand in demands:
        ordered[demand.sku] += demand.qty
    candidates = set(ordered) | {s for d in demands for s in d.substitutes}
    free = {level.key: level.available_to(tier) for level in stock if level.sku in candidates}
    priority = {w.warehouse_id: w.priority for w in warehouses}
    on_offer = Counter[str]()
    for (_, sku), qty in free.items():
        on_offer[sku] += qty
    short_skus = {sku for sku, qty in ordered.items() if on_offer[sku] < qty}
    relevant = set(ordered) | {s for d in demands if d.sku in short_skus for s in d.substitutes}
    order_stock = Counter[str]()
    for (warehouse_id, sku), qty in free.items():
        if sku in relevant:
            order_stock[warehouse_id] += qty
    ranked = sorted(
        (w for w, qty in order_stock.items() if qty > 0),
        key=lambda w: (priority.get(w, DEFAULT_PRIORITY), -order_stock[w], w),
    )
    if len(ranked) > MAX_EXACT_WAREHOUSES:
        return _fewest_greedily(demands, ranked, free, short_skus, _fill(demands, ranked, free, short_skus).units)
    singles = []
    for warehouse_id in ranked:
        plan = _fill(demands, (warehouse_id,), free, short_skus)
        if plan.complete:
            return plan
        singles.append(plan)
    # No single warehouse covers the order: the fewest that give the most units all of them give.
    most = _fill(demands, ranked, free, short_skus)
    for size in range(1, len(ranked)):
        # combinations() keeps the ranking: the first set that gives the most is the best-ranked one.
        trials = singles if size == 1 else (_fill(demands, c, free, short_skus) for c in combinations(ranked, size))
        for plan in trials:
            if plan.units == most.units:
                return plan
    return most


def _fewest_greedily(
    demands: Sequence[Demand], ranked: Sequence[str], free: Mapping[StockKey, int], short_skus: set[str], most: int
) -> Plan:
    """Add the warehouse that gains the most units (the best-ranked on a tie) until the chosen
    ones give as many units as all of them (``most``)."""
    rank = {w: i for i, w in enumerate(ranked)}
    chosen: list[str] = []
    plan = _fill(demands, chosen, free, short_skus)
    while plan.units < most:
        options = [w for w in ranked if w not in chosen]
        trials = [(_fill(demands, sorted([*chosen, w], key=rank.__getitem__), free, short_skus), w) for w in options]
        plan, best = max(trials, key=lambda trial: (trial[0].units, -rank[trial[1]]))
        chosen.append(best)
    return plan


def _fill(
    demands: Sequence[Demand], warehouse_ids: Sequence[str], free: Mapping[StockKey, int], short_skus: set[str]
) -> Plan:
    """Fill from the given warehouses: ordered SKUs go to the lines that ordered them, then
    consented substitutes to lines whose SKU is short, as many units as there are; units
    are taken from the warehouses in the order given."""
    chosen = set(warehouse_ids)
    supply = Counter[str]()
    for (warehouse_id, sku), qty in free.items():
        if warehouse_id in chosen:
            supply[sku] += qty
    lines = [(d.line_no, d.sku, d.qty, d.substitutes if d.sku in short_skus else ()) for d in demands]
    units = assign_units(lines, supply)
    left = dict(free)
    taken: dict[tuple[int, str, str], int] = {}

    def take(line_no: int, sku: str, qty: int) -> None:
        for warehouse_id in warehouse_ids:
            if qty == 0:
                return
            got = min(qty, left.get((warehouse_id, sku), 0))
            if got > 0:
                left[(warehouse_id, sku)] -= got
                qty -= got
                key = (line_no, sku, warehouse_id)
                taken[key] = taken.get(key, 0) + got

    for demand in demands:
        take(demand.line_no, demand.sku, units.get((demand.line_no, demand.sku), 0))
    for demand in demands:
        for sku in dict.fromkeys(demand.substitutes):
            if sku != demand.sku:
                take(demand.line_no, sku, units.get((demand.line_no, sku), 0))
    by_line = {d.line_no: d for d in demands}
    allocations = tuple(
        AllocatedLine(
            line_no=line_no,
            sku=sku,
            qty=qty,
            warehouse_id=warehouse_id,
            substitute_for=None if sku == by_line[line_no].sku else by_line[line_no].sku,
        )
        for (line_no, sku, warehouse_id), qty in taken.items()
    )
    filled = Counter[int]()
    for (line_no, _, _), qty in taken.items():
        filled[line_no] += qty
    shortfalls = tuple(
        LineQuantity(line_no=d.line_no, sku=d.sku, qty=d.qty - filled[d.line_no])
        for d in demands
        if d.qty > filled[d.line_no]
    )
    return Plan(allocations, shortfalls)


UnitsBySku = dict[tuple[int, str], int]
"""Units per (line_no, sku)."""
_PathState = tuple[str, bool]
"""A SKU on an augmenting path, and whether a line that ordered it reached it."""


def assign_units(lines: Sequence[tuple[int, str, int, Sequence[str]]], supply: Mapping[str, int]) -> UnitsBySku:
    """Which line gets how many units of which SKU, filling as many units as there are.

    ``lines`` are (line_no, ordered SKU, qty, consented substitutes the line may take now,
    in the customer's order of preference). Ordered SKUs go to the lines that ordered them
    (in line order), then each line takes its preferred substitutes; then units are moved
    along augmenting paths (a maximum flow) wherever that fills one more unit. A path never
    gives a unit that a line ordered to another line as its substitute, and never assigns
    anything that was not ordered or consented."""
    own = {line_no: sku for line_no, sku, _, _ in lines}
    options = {
        line_no: (sku, *(s for s in dict.fromkeys(substitutes) if s != sku)) for line_no, sku, _, substitutes in lines
    }
    unmet = {line_no: qty for line_no, _, qty, _ in lines}
    spare = dict(supply)
    flow: UnitsBySku = {}

    def give(line_no: int, sku: str) -> None:
        units = min(unmet[line_no], spare.get(sku, 0))
        if units > 0:
            flow[(line_no, sku)] = flow.get((line_no, sku), 0) + units
            unmet[line_no] -= units
            spare[sku] -= units

    for line_no, sku, _, _ in lines:
        give(line_no, sku)
    for line_no, _, _, _ in lines:
        for sku in options[line_no][1:]:
            give(line_no, sku)
    if any(len(o) > 1 for o in options.values()):
        while (path := _augmenting_path(own, options, unmet, flow, spare)) is not None:
            units = min(unmet[path[0][0]], spare[path[-1][1]])
            for line_no, sku, forward in path:
                if not forward:
                    units = min(units, flow[(line_no, sku)])
            for line_no, sku, forward in path:
                flow[(line_no, sku)] = flow.get((line_no, sku), 0) + (units if forward else -units)
            unmet[path[0][0]] -= units
            spare[path[-1][1]] -= units
    return {key: units for key, units in flow.items() if units > 0}


def _augmenting_path(
    own: Mapping[int, str],
    options: Mapping[int, Sequence[str]],
    unmet: Mapping[int, int],
    flow: Mapping[tuple[int, str], int],
    spare: Mapping[str, int],
) -> list[tuple[int, str, bool]] | None:
    """The shortest chain: a line short of units -> a SKU it may take -> a line holding units
    of that SKU that may take another SKU instead -> ... -> a SKU with spare units. Edges are
    (line_no, sku, forward): forward takes units, backward gives them up. A SKU reached as a
    substitute may only be taken from lines that hold it as a substitute."""
    came_to: dict[_PathState, int] = {}
    came_from: dict[int, _PathState | None] = {line_no: None for line_no, want in unmet.items() if want > 0}
    queue = deque(came_from)
    while queue:
        line_no = queue.popleft()
        for sku in options[line_no]:
            state = (sku, own[line_no] == sku)
            if state in came_to:
                continue
            came_to[state] = line_no
            if spare.get(sku, 0) > 0:
                path: list[tuple[int, str, bool]] = []
                at: _PathState | None = state
                while at is not None:
                    taker = came_to[at]
                    path.append((taker, at[0], True))
                    at = came_from[taker]
                    if at is not None:
                        path.append((taker, at[0], False))
                path.reverse()
                return path
            for holder in options:
                if holder in came_from or flow.get((holder, sku), 0) == 0:
                    continue
                if state[1] or own[holder] != sku:
                    came_from[holder] = state
                    queue.append(holder)
    return None


def arriving(inbound: Iterable[Inbound], today: date | None) -> list[Inbound]:
    """Arrivals still to come, in ETA order. One whose ETA has passed without the goods is
    overdue: its date is no promise any more, so it gives no date (until its ETA is updated)."""
    return sorted(
        (a for a in inbound if a.qty > 0 and (today is None or a.eta >= today)),
        key=lambda a: a.eta,
    )


def expected_restock_date(
    shortfalls: Iterable[LineQuantity],
    inbound: Iterable[Inbound],
    ahead: Mapping[str, int] | None = None,
    *,
    today: date | None = None,
) -> date | None:
    """The date by which known inbound purchases cover every short line, after the units
    that orders ahead in the queue wait for (``ahead``, by SKU); None when they never do.
    Arrivals due before ``today`` are overdue and count for nothing."""
    short = Counter[str]()
    for line in shortfalls:
        short[line.sku] += line.qty
    coming = arriving(inbound, today)
    latest: date | None = None
    for sku, qty in short.items():
        covered_on = _covered_on(sku, (ahead or {}).get(sku, 0) + qty, coming)
        if covered_on is None:
            return None
        latest = covered_on if latest is None or covered_on > latest else latest
    return latest


def _covered_on(sku: str, units: int, coming: Iterable[Inbound]) -> date | None:
    expected = 0
    for arrival in coming:
        if arrival.sku == sku:
            expected += arrival.qty
            if expected >= units:
                return arrival.eta
    return None


def queue_restock_dates(
    queue: Sequence[LineQuantity], inbound: Sequence[Inbound], *, today: date | None = None
) -> list[date | None]:
    """For waiting lines in serving order: when known inbound purchases reach each one."""
    coming = arriving(inbound, today)
    waiting_before = Counter[str]()
    dates: list[date | None] = []
    for line in queue:
        waiting_before[line.sku] += line.qty
        dates.append(_covered_on(line.sku, waiting_before[line.sku], coming))
    return dates


def backorder_reason(shortfalls: Iterable[LineQuantity]) -> str:
    skus = sorted({line.sku for line in shortfalls})
    return "insufficient stock: " + ", ".join(skus)


def events_on_receipt(
    order: OrderReceived,
    plan: Plan,
    inbound: Iterable[Inbound],
    *,
    at: datetime,
    ahead: Mapping[str, int] | None = None,
    warehouses: Iterable[Warehouse] = (),
) -> list[OrderEvent]:
    """What the world is told after the first allocation attempt of an order."""
    events: list[OrderEvent] = []
    if plan.allocations and (order.allow_partial or plan.complete):
        events.append(
            OrderAllocated(
                order_id=order.order_id,
                occurred_at=at,
                allocations=plan.allocations,
                complete=plan.complete,
                first_pass=True,
                handling_hours=handling_of(plan.allocations, warehouses),
            )
        )
    if plan.shortfalls:
        events.append(
            OrderBackordered(
                order_id=order.order_id,
                occurred_at=at,
                lines=plan.shortfalls,
                expected_restock_date=expected_restock_date(plan.shortfalls, inbound, ahead, today=at.date()),
                reason=backorder_reason(plan.shortfalls),
            )
        )
    return events


@dataclass(frozen=True)
class WaitingOrder:
    """An order with backordered lines, as the queue sees it."""

    order_id: str
    tier: CustomerTier
    allow_partial: bool
    placed_at: datetime
    demands: tuple[Demand, ...]
    sequence: int = 0
    """Tie-break among orders placed at the same instant: first queued, first served."""


QueuePlace = tuple[int, datetime]
"""(tier rank, placed_at): where an order stands in the queue."""


def queue_place(tier: CustomerTier, placed_at: datetime) -> QueuePlace:
    return (tier_rank(tier), placed_at)


def serving_key(waiting: WaitingOrder) -> tuple[int, datetime, int, str]:
    return (tier_rank(waiting.tier), waiting.placed_at, waiting.sequence, waiting.order_id)


def tier_rank(tier: CustomerTier) -> int:
    """Core customers are served first."""
    return 0 if tier is CustomerTier.CORE else 1


@dataclass(frozen=True)
class Release:
    order_id: str
    plan: Plan
    """What the order gets now; plan.complete when nothing of it waits any more."""


@dataclass
class _Ledger:
    by_sku: dict[str, dict[StockKey, StockLevel]] = field(default_factory=dict)

    def of(self, demands: Iterable[Demand]) -> list[StockLevel]:
        """The levels of every SKU these demands could be filled with."""
        skus = {sku for d in demands for sku in (d.sku, *d.substitutes)}
        return [level for sku in skus for level in self.by_sku.get(sku, {}).values()]

    def has_free(self, demands: Iterable[Demand], tier: CustomerTier) -> bool:
        return any(level.available_to(tier) > 0 for level in self.of(demands))

    def reserve(self, allocations: Iterable[AllocatedLine], tier: CustomerTier) -> None:
        for a in allocations:
            levels = self.by_sku[a.sku]
            levels[(a.warehouse_id, a.sku)] = levels[(a.warehouse_id, a.sku)].reserve(a.qty, tier)


def plan_releases(
    queue: Iterable[WaitingOrder], stock: Iterable[StockLevel], warehouses: Iterable[Warehouse] = ()
) -> list[Release]:
    """Serve waiting orders strictly in queue order from free stock: each takes what is free
    to it. A ship-complete order holds what it takes (the caller announces it only once it
    is complete), so the orders behind it can never take its place indefinitely."""
    ledger = _Ledger()
    for level in stock:
        ledger.by_sku.setdefault(level.sku, {})[level.key] = level
    warehouse_list = list(warehouses)
    releases: list[Release] = []
    for waiting in sorted(queue, key=serving_key):
        if not ledger.has_free(waiting.demands, waiting.tier):
            continue
        plan = plan_allocation(waiting.demands, waiting.tier, ledger.of(waiting.demands), warehouse_list)
        if not plan.allocations:
            continue
        ledger.reserve(plan.allocations, waiting.tier)
        releases.append(Release(waiting.order_id, plan))
    return releases


def merge_allocations(allocations: Iterable[AllocatedLine]) -> tuple[AllocatedLine, ...]:
    """One allocation per (line, sku, warehouse), in first-seen order."""
    merged: dict[tuple[int, str, str], AllocatedLine] = {}
    for a in allocations:
        key = (a.line_no, a.sku, a.warehouse_id)
        seen = merged.get(key)
        merged[key] = a if seen is None else seen.model_copy(update={"qty": seen.qty + a.qty})
    return tuple(merged.values())


def still_wanted(demands: Sequence[Demand], allocations: Iterable[AllocatedLine]) -> list[Demand]:
    """The demands left after the given allocations (lines fully covered drop out)."""
    covered = Counter[int]()
    for a in allocations:
        covered[a.line_no] += a.qty
    return [replace(d, qty=d.qty - covered[d.line_no]) for d in demands if d.qty > covered[d.line_no]]


def plan_of(demands: Sequence[Demand], allocations: Iterable[AllocatedLine]) -> Plan:
    """The plan that these allocations make of these demands."""
    merged = merge_allocations(allocations)
    shortfalls = tuple(LineQuantity(line_no=d.line_no, sku=d.sku, qty=d.qty) for d in still_wanted(demands, merged))
    return Plan(merged, shortfalls)
