"""Properties of the pure rules over generated stock and orders, checked against an
independent oracle (a textbook max-flow over every subset of warehouses)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable, Sequence
from datetime import timedelta
from itertools import combinations

from fulfil.events import CustomerTier
from hypothesis import example, given, settings
from hypothesis import strategies as st
from inventory import domain
from inventory.domain import Demand, StockLevel, WaitingOrder, Warehouse
from inventory_builders import T0

SKUS = ["A", "B", "C", "D"]
WAREHOUSE_IDS = ["W1", "W2", "W3"]


@st.composite
def stock_levels(draw: st.DrawFn) -> list[StockLevel]:
    levels = []
    for warehouse_id in WAREHOUSE_IDS:
        for sku in SKUS:
            if draw(st.booleans()):
                on_hand = draw(st.integers(0, 12))
                reserved = draw(st.integers(0, on_hand))
                protected = draw(st.integers(0, on_hand))
                reserved_for_core = draw(st.integers(0, reserved))
                levels.append(StockLevel(warehouse_id, sku, on_hand, reserved, protected, reserved_for_core))
    return levels


@st.composite
def demand_lists(draw: st.DrawFn) -> list[Demand]:
    count = draw(st.integers(1, 4))
    return [
        Demand(
            line_no,
            draw(st.sampled_from(SKUS)),
            draw(st.integers(1, 15)),
            tuple(draw(st.lists(st.sampled_from(SKUS), max_size=2, unique=True))),
        )
        for line_no in range(1, count + 1)
    ]


warehouses = st.lists(st.integers(0, 3), min_size=3, max_size=3).map(
    lambda priorities: [Warehouse(w, p) for w, p in zip(WAREHOUSE_IDS, priorities, strict=True)]
)
tiers = st.sampled_from(list(CustomerTier))


@settings(max_examples=300, deadline=None)
@given(stock_levels(), demand_lists(), warehouses, tiers)
def test_a_plan_never_takes_more_than_is_free_nor_more_than_was_asked(
    stock: list[StockLevel], demands: list[Demand], houses: list[Warehouse], tier: CustomerTier
) -> None:
    plan = domain.plan_allocation(demands, tier, stock, houses)
    free = {level.key: level.available_to(tier) for level in stock}
    taken = Counter[tuple[str, str]]()
    per_line = Counter[int]()
    by_line = {d.line_no: d for d in demands}
    for a in plan.allocations:
        taken[(a.warehouse_id, a.sku)] += a.qty
        per_line[a.line_no] += a.qty
        ordered = by_line[a.line_no]
        # Only the ordered SKU or one the customer consented to, and marked as such.
        assert a.sku == ordered.sku or (a.sku in ordered.substitutes and a.substitute_for == ordered.sku)
        assert (a.substitute_for is None) == (a.sku == ordered.sku)
    assert all(qty <= free.get(key, 0) for key, qty in taken.items())
    shortfall = Counter({s.line_no: s.qty for s in plan.shortfalls})
    # Every unit asked for is either allocated or reported short, never both, never more.
    assert all(per_line[d.line_no] + shortfall[d.line_no] == d.qty for d in demands)


# -- the oracle: most units any set of warehouses can give, by max-flow -------------------


def max_flow(capacity: dict[Hashable, dict[Hashable, int]], source: Hashable, sink: Hashable) -> int:
    """Edmonds-Karp, written for this test only."""
    residual: dict[Hashable, dict[Hashable, int]] = {}
    for u, edges in capacity.items():
        for v, cap in edges.items():
            residual.setdefault(u, {})[v] = residual.get(u, {}).get(v, 0) + cap
            residual.setdefault(v, {}).setdefault(u, 0)
    total = 0
    while True:
        parent: dict[Hashable, Hashable | None] = {source: None}
        queue = deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, cap in residual.get(u, {}).items():
                if cap > 0 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return total
        path = []
        node = sink
        while (before := parent[node]) is not None:
            path.append((before, node))
            node = before
        bottleneck = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= bottleneck
            residual[v][u] += bottleneck
        total += bottleneck


def units_from(
    demands: Sequence[Demand], free: dict[tuple[str, str], int], chosen: Iterable[str], short: set[str]
) -> int:
    """Ordered SKUs first to the lines that ordered them; what a globally short SKU still
    lacks may come from consented substitutes, spread over its lines as suits best."""
    chosen = set(chosen)
    supply = Counter[str]()
    for (warehouse_id, sku), qty in free.items():
        if warehouse_id in chosen:
            supply[sku] += qty
    ordered = Counter[str]()
    for d in demands:
        ordered[d.sku] += d.qty
    own = {sku: min(qty, supply[sku]) for sku, qty in ordered.items()}
    spare = {sku: supply[sku] - own.get(sku, 0) for sku in supply}
    big = sum(ordered.values())
    graph: dict[Hashable, dict[Hashable, int]] = {}
    for sku in short:
        graph.setdefault("source", {})[("lacking", sku)] = ordered[sku] - own[sku]
    for d in demands:
        if d.sku in short:
            graph.setdefault(("lacking", d.sku), {})[("line", d.line_no)] = d.qty
            for substitute in set(d.substitutes) - {d.sku}:
                graph.setdefault(("line", d.line_no), {})[("sku", substitute)] = big
    for sku, qty in spare.items():
        graph.setdefault(("sku", sku), {})["sink"] = qty
    return sum(own.values()) + max_flow(graph, "source", "sink")


@settings(max_examples=400, deadline=None)
@given(stock_levels(), demand_lists(), warehouses, tiers)
@example(
    # PAR has A5; LYS has A5 + B3: LYS alone gives the most (8), no split.
    stock=[StockLevel("W1", "A", 5), StockLevel("W2", "A", 5), StockLevel("W2", "B", 3)],
    demands=[Demand(1, "A", 5), Demand(2, "B", 5)],
    houses=[Warehouse("W1", 1), Warehouse("W2", 2), Warehouse("W3", 3)],
    tier=CustomerTier.STANDARD,
)
@example(
    # Greedy by priority takes W1 4 + W2 3 + W3 3 (three warehouses); W1 + W3 suffice.
    stock=[StockLevel("W1", "A", 4), StockLevel("W2", "A", 3), StockLevel("W3", "A", 7)],
    demands=[Demand(1, "A", 10)],
    houses=[Warehouse("W1", 1), Warehouse("W2", 2), Warehouse("W3", 3)],
    tier=CustomerTier.STANDARD,
)
@example(
    # Line 1 may take C or D, line 2 only C: both are filled only if line 1 takes D.
    stock=[StockLevel("W1", "C", 1), StockLevel("W1", "D", 1)],
    demands=[Demand(1, "A", 1, ("C", "D")), Demand(2, "B", 1, ("C",))],
    houses=[Warehouse("W1", 1), Warehouse("W2", 2), Warehouse("W3", 3)],
    tier=CustomerTier.STANDARD,
)
def test_a_plan_gives_the_most_units_from_the_fewest_warehouses(
    stock: list[StockLevel], demands: list[Demand], houses: list[Warehouse], tier: CustomerTier
) -> None:
    plan = domain.plan_allocation(demands, tier, stock, houses)
    free = {level.key: level.available_to(tier) for level in stock}
    on_offer = Counter[str]()
    for (_, sku), qty in free.items():
        on_offer[sku] += qty
    ordered = Counter[str]()
    for d in demands:
        ordered[d.sku] += d.qty
    short = {sku for sku, qty in ordered.items() if on_offer[sku] < qty}
    most = units_from(demands, free, WAREHOUSE_IDS, short)
    assert plan.units == most
    fewest = next(
        size
        for size in range(len(WAREHOUSE_IDS) + 1)
        if any(units_from(demands, free, chosen, short) == most for chosen in combinations(WAREHOUSE_IDS, size))
    )
    assert len(plan.warehouses()) == fewest
    if fewest == 1 and plan.complete:
        # Among single warehouses that cover the order, the best priority wins.
        priority = {w.warehouse_id: w.priority for w in houses}
        covering = [w for w in WAREHOUSE_IDS if units_from(demands, free, [w], short) == most]
        (chosen,) = plan.warehouses()
        assert priority[chosen] == min(priority[w] for w in covering)


@settings(max_examples=300, deadline=None)
@given(stock_levels(), st.lists(st.tuples(demand_lists(), tiers, st.booleans()), max_size=6), warehouses)
def test_releases_follow_the_queue_and_respect_the_core_reserve(
    stock: list[StockLevel], orders: list[tuple[list[Demand], CustomerTier, bool]], houses: list[Warehouse]
) -> None:
    queue = [
        WaitingOrder(f"o{i}", tier, partial, T0 + timedelta(minutes=i), tuple(demands))
        for i, (demands, tier, partial) in enumerate(orders)
    ]
    releases = domain.plan_releases(queue, stock, houses)
    by_id = {w.order_id: w for w in queue}
    core_taken = Counter[tuple[str, str]]()
    standard_taken = Counter[tuple[str, str]]()
    got = Counter[tuple[str, int]]()
    for release in releases:
        tier = by_id[release.order_id].tier
        for a in release.plan.allocations:
            (core_taken if tier is CustomerTier.CORE else standard_taken)[(a.warehouse_id, a.sku)] += a.qty
            got[(release.order_id, a.line_no)] += a.qty
    after = {
        level.key: domain.StockLevel(
            level.warehouse_id,
            level.sku,
            level.on_hand,
            level.reserved + core_taken[level.key] + standard_taken[level.key],
            level.protected_for_core,
            level.reserved_for_core + core_taken[level.key],
        )
        for level in stock
    }
    for key, level in after.items():
        before = next(s for s in stock if s.key == key)
        # Never more than is free, whoever takes it.
        assert core_taken[key] + standard_taken[key] <= before.available
        if standard_taken[key]:
            # Standard orders leave the part of the core reserve core orders have not taken.
            assert level.on_hand - level.reserved >= level.protected_left, (before, level)
    # Strictly in queue order: an order still short of an ordered SKU leaves none of it free to it.
    for waiting in queue:
        for d in waiting.demands:
            if got[(waiting.order_id, d.line_no)] < d.qty:
                assert all(level.available_to(waiting.tier) == 0 for level in after.values() if level.sku == d.sku)
