"""The allocation rules on small hand-checked scenarios (no database, no broker)."""

from __future__ import annotations

from datetime import date, timedelta

from fulfil.events import AllocatedLine, CustomerTier, LineQuantity, OrderAllocated, OrderBackordered
from inventory import domain
from inventory.domain import Demand, Inbound, StockLevel, WaitingOrder, Warehouse
from inventory_builders import T0, line, order

CORE = CustomerTier.CORE
STANDARD = CustomerTier.STANDARD


def alloc(line_no: int, sku: str, qty: int, warehouse_id: str, substitute_for: str | None = None) -> AllocatedLine:
    return AllocatedLine(line_no=line_no, sku=sku, qty=qty, warehouse_id=warehouse_id, substitute_for=substitute_for)


def short(line_no: int, sku: str, qty: int) -> LineQuantity:
    return LineQuantity(line_no=line_no, sku=sku, qty=qty)


def plan(demands: list[Demand], stock: list[StockLevel], warehouses: list[Warehouse], tier: CustomerTier = STANDARD):  # type: ignore[no-untyped-def]
    return domain.plan_allocation(demands, tier, stock, warehouses)


WAREHOUSES = [Warehouse("PAR", 1), Warehouse("LYS", 2), Warehouse("MRS", 3)]


# -- one warehouse, split, fewest warehouses -------------------------------------------


def test_one_warehouse_covers_the_whole_order() -> None:
    stock = [StockLevel("PAR", "A", 10), StockLevel("PAR", "B", 3)]
    result = plan([Demand(1, "A", 4), Demand(2, "B", 3)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 4, "PAR"), alloc(2, "B", 3, "PAR"))
    assert result.complete


def test_single_warehouse_is_preferred_to_a_split_even_at_lower_priority() -> None:
    # PAR (priority 1) has only A; MRS (priority 3) has both: no split shipment.
    stock = [StockLevel("PAR", "A", 10), StockLevel("MRS", "A", 5), StockLevel("MRS", "B", 5)]
    result = plan([Demand(1, "A", 2), Demand(2, "B", 2)], stock, WAREHOUSES)
    assert result.warehouses() == {"MRS"}
    assert result.complete


def test_among_covering_warehouses_priority_wins() -> None:
    stock = [StockLevel("LYS", "A", 100), StockLevel("PAR", "A", 5)]
    assert plan([Demand(1, "A", 5)], stock, WAREHOUSES).allocations == (alloc(1, "A", 5, "PAR"),)


def test_at_equal_priority_the_warehouse_with_most_stock_wins() -> None:
    warehouses = [Warehouse("W1", 1), Warehouse("W2", 1)]
    stock = [StockLevel("W1", "A", 6), StockLevel("W2", "A", 9)]
    assert plan([Demand(1, "A", 5)], stock, warehouses).allocations == (alloc(1, "A", 5, "W2"),)


def test_split_shipment_when_no_warehouse_covers_the_order() -> None:
    stock = [StockLevel("PAR", "A", 5), StockLevel("LYS", "B", 5)]
    result = plan([Demand(1, "A", 5), Demand(2, "B", 5)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 5, "PAR"), alloc(2, "B", 5, "LYS"))
    assert result.complete


def test_split_uses_the_fewest_warehouses_not_the_greedy_order() -> None:
    # Greedy by priority would take PAR 4 + LYS 3 + MRS 3 (three warehouses); PAR + MRS suffice.
    stock = [StockLevel("PAR", "A", 4), StockLevel("LYS", "A", 3), StockLevel("MRS", "A", 7)]
    result = plan([Demand(1, "A", 10)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 4, "PAR"), alloc(1, "A", 6, "MRS"))


def test_when_nothing_covers_the_order_no_split_adds_nothing() -> None:
    # PAR has A5; LYS has A5 + B3: LYS alone gives the same 8 units as PAR A5 + LYS B3.
    stock = [StockLevel("PAR", "A", 5), StockLevel("LYS", "A", 5), StockLevel("LYS", "B", 3)]
    result = plan([Demand(1, "A", 5), Demand(2, "B", 5)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 5, "LYS"), alloc(2, "B", 3, "LYS"))
    assert result.shortfalls == (short(2, "B", 2),)


def test_when_nothing_covers_the_order_the_fewest_warehouses_give_the_most() -> None:
    # The best-ranked warehouse alone gives 4; PAR + MRS give all 9 there are, LYS adds nothing more.
    stock = [
        StockLevel("PAR", "A", 4),
        StockLevel("LYS", "A", 1),
        StockLevel("LYS", "B", 1),
        StockLevel("MRS", "B", 5),
        StockLevel("MRS", "A", 1),
    ]
    result = plan([Demand(1, "A", 5), Demand(2, "B", 9)], stock, WAREHOUSES)
    assert result.units == 11
    assert result.warehouses() == {"PAR", "LYS", "MRS"}  # every unit counts: all three are needed
    result = plan([Demand(1, "A", 5), Demand(2, "B", 3)], stock, WAREHOUSES)
    assert (result.units, result.warehouses()) == (8, {"PAR", "MRS"})


def test_beyond_the_exhaustive_limit_warehouses_are_added_by_units_gained() -> None:
    houses = [Warehouse(f"W{i:02d}", i) for i in range(10)]
    stock = [StockLevel(f"W{i:02d}", "A", 1) for i in range(9)] + [StockLevel("W09", "A", 8)]
    result = plan([Demand(1, "A", 9)], stock, houses)
    assert result.complete
    assert result.warehouses() == {"W00", "W09"}


def test_shortage_takes_everything_available_and_reports_the_rest() -> None:
    stock = [StockLevel("PAR", "A", 2), StockLevel("LYS", "A", 1), StockLevel("PAR", "B", 9)]
    result = plan([Demand(1, "A", 5), Demand(2, "B", 1)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 2, "PAR"), alloc(1, "A", 1, "LYS"), alloc(2, "B", 1, "PAR"))
    assert result.shortfalls == (short(1, "A", 2),)


def test_two_lines_of_the_same_sku_share_the_stock() -> None:
    stock = [StockLevel("PAR", "A", 5)]
    result = plan([Demand(1, "A", 3), Demand(2, "A", 3)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 3, "PAR"), alloc(2, "A", 2, "PAR"))
    assert result.shortfalls == (short(2, "A", 1),)


def test_reserved_units_are_not_free() -> None:
    stock = [StockLevel("PAR", "A", 5, reserved=4)]
    result = plan([Demand(1, "A", 3)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 1, "PAR"),)
    assert result.shortfalls == (short(1, "A", 2),)


# -- substitutes (only with consent) ---------------------------------------------------


def test_short_line_takes_a_consented_substitute() -> None:
    stock = [StockLevel("PAR", "A", 1), StockLevel("PAR", "A2", 10)]
    result = plan([Demand(1, "A", 3, ("A2",))], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A", 1, "PAR"), alloc(1, "A2", 2, "PAR", substitute_for="A"))
    assert result.complete


def test_no_substitute_without_consent() -> None:
    stock = [StockLevel("PAR", "A2", 10)]
    result = plan([Demand(1, "A", 3)], stock, WAREHOUSES)
    assert result.allocations == ()
    assert result.shortfalls == (short(1, "A", 3),)


def test_substitute_consented_for_one_line_is_not_used_for_another() -> None:
    stock = [StockLevel("PAR", "A2", 10)]
    result = plan([Demand(1, "A", 1, ("A2",)), Demand(2, "B", 1)], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "A2", 1, "PAR", substitute_for="A"),)
    assert result.shortfalls == (short(2, "B", 1),)


def test_no_substitute_while_the_ordered_sku_can_be_had_even_by_splitting() -> None:
    stock = [StockLevel("PAR", "A", 3), StockLevel("PAR", "A2", 10), StockLevel("LYS", "A", 3)]
    result = plan([Demand(1, "A", 5, ("A2",))], stock, WAREHOUSES)
    assert {a.sku for a in result.allocations} == {"A"}
    assert result.warehouses() == {"PAR", "LYS"}


def test_substitutes_are_assigned_so_that_the_most_units_are_filled() -> None:
    # Line 1 may take C or D, line 2 only C; one C and one D: line 1 must take D for both to be filled.
    stock = [StockLevel("PAR", "C", 1), StockLevel("PAR", "D", 1)]
    result = plan([Demand(1, "A", 1, ("C", "D")), Demand(2, "B", 1, ("C",))], stock, WAREHOUSES)
    assert sorted(result.allocations, key=lambda a: a.line_no) == [
        alloc(1, "D", 1, "PAR", substitute_for="A"),
        alloc(2, "C", 1, "PAR", substitute_for="B"),
    ]
    assert result.complete


def test_the_customers_preferred_substitute_is_taken_when_it_costs_nothing() -> None:
    stock = [StockLevel("PAR", "C", 5), StockLevel("PAR", "D", 5)]
    result = plan([Demand(1, "A", 2, ("C", "D"))], stock, WAREHOUSES)
    assert result.allocations == (alloc(1, "C", 2, "PAR", substitute_for="A"),)


def test_units_of_an_ordered_sku_go_to_the_line_that_has_no_other_choice() -> None:
    # Both lines ordered A (1 unit); line 1 would accept C. A to line 2, C to line 1: both filled.
    stock = [StockLevel("PAR", "A", 1), StockLevel("PAR", "C", 1)]
    result = plan([Demand(1, "A", 1, ("C",)), Demand(2, "A", 1)], stock, WAREHOUSES)
    assert sorted(result.allocations, key=lambda a: a.line_no) == [
        alloc(1, "C", 1, "PAR", substitute_for="A"),
        alloc(2, "A", 1, "PAR"),
    ]


def test_an_ordered_sku_is_never_moved_to_another_line_as_its_substitute() -> None:
    # Line 1 ordered A (or C); line 2 ordered B and would take A. A stays with line 1.
    stock = [StockLevel("PAR", "A", 1), StockLevel("PAR", "C", 1)]
    result = plan([Demand(1, "A", 2, ("C",)), Demand(2, "B", 1, ("A",))], stock, WAREHOUSES)
    assert sorted(result.allocations, key=lambda a: (a.line_no, a.sku)) == [
        alloc(1, "A", 1, "PAR"),
        alloc(1, "C", 1, "PAR", substitute_for="A"),
    ]
    assert result.shortfalls == (short(2, "B", 1),)


def test_ordered_skus_go_to_their_own_lines_before_substitutes() -> None:
    # Line 1 may take B instead of A, but line 2 ordered B itself: B goes to line 2 first.
    stock = [StockLevel("PAR", "B", 2)]
    result = plan([Demand(1, "A", 2, ("B",)), Demand(2, "B", 2)], stock, WAREHOUSES)
    assert result.allocations == (alloc(2, "B", 2, "PAR"),)
    assert result.shortfalls == (short(1, "A", 2),)


# -- protected stock for core customers ---------------------------------------------


def test_standard_customers_cannot_take_protected_units() -> None:
    stock = [StockLevel("PAR", "A", 10, protected_for_core=8)]
    result = plan([Demand(1, "A", 5)], stock, WAREHOUSES, STANDARD)
    assert result.allocations == (alloc(1, "A", 2, "PAR"),)
    assert result.shortfalls == (short(1, "A", 3),)


def test_core_customers_can_take_protected_units() -> None:
    stock = [StockLevel("PAR", "A", 10, protected_for_core=8)]
    result = plan([Demand(1, "A", 10)], stock, WAREHOUSES, CORE)
    assert result.allocations == (alloc(1, "A", 10, "PAR"),)


def test_protection_counts_after_reservations() -> None:
    level = StockLevel("PAR", "A", 10, reserved=3, protected_for_core=5)
    assert (level.available, level.available_to(STANDARD), level.available_to(CORE)) == (7, 2, 7)


def test_units_core_orders_took_from_the_reserve_are_no_longer_protected() -> None:
    # 10 on hand, 2 held for core, and core orders hold 2: the reserve is used up, standard may take 8.
    level = StockLevel("PAR", "A", 10, reserved=2, protected_for_core=2, reserved_for_core=2)
    assert (level.protected_left, level.available_to(STANDARD), level.available_to(CORE)) == (0, 8, 8)
    # Core holds 1 of them: 1 stays protected.
    level = StockLevel("PAR", "A", 10, reserved=1, protected_for_core=2, reserved_for_core=1)
    assert (level.protected_left, level.available_to(STANDARD)) == (1, 8)
    # Standard orders' reservations do not use up the reserve.
    level = StockLevel("PAR", "A", 10, reserved=5, protected_for_core=2, reserved_for_core=0)
    assert (level.protected_left, level.available_to(STANDARD)) == (2, 3)


def test_a_core_reservation_counts_toward_the_reserve() -> None:
    level = StockLevel("PAR", "A", 10, protected_for_core=2).reserve(2, CORE)
    assert (level.reserved, level.reserved_for_core, level.available_to(STANDARD)) == (2, 2, 8)
    level = level.reserve(8, STANDARD)
    assert (level.reserved, level.reserved_for_core, level.available) == (10, 2, 0)


# -- what the world is told -------------------------------------------------------------


def test_allow_partial_allocates_now_and_backorders_the_rest() -> None:
    received = order("o1", line(1, "A", 5), line(2, "B", 2), allow_partial=True)
    result = plan(domain.demands_of(received), [StockLevel("PAR", "A", 3), StockLevel("PAR", "B", 2)], WAREHOUSES)
    inbound = [Inbound("LYS", "A", 1, date(2026, 3, 5)), Inbound("PAR", "A", 5, date(2026, 3, 9))]
    events = domain.events_on_receipt(received, result, inbound, at=T0)
    assert events == [
        OrderAllocated(
            order_id="o1",
            occurred_at=T0,
            allocations=(alloc(1, "A", 3, "PAR"), alloc(2, "B", 2, "PAR")),
            complete=False,
            first_pass=True,
        ),
        OrderBackordered(
            order_id="o1",
            occurred_at=T0,
            lines=(short(1, "A", 2),),
            expected_restock_date=date(2026, 3, 9),  # 1 unit on the 5th is not enough; 1 + 5 by the 9th
            reason="insufficient stock: A",
        ),
    ]


def test_ship_complete_order_is_only_backordered_while_short() -> None:
    received = order("o1", line(1, "A", 5), allow_partial=False)
    result = plan(domain.demands_of(received), [StockLevel("PAR", "A", 3)], WAREHOUSES)
    events = domain.events_on_receipt(received, result, [], at=T0)
    assert [type(e) for e in events] == [OrderBackordered]
    assert isinstance(events[0], OrderBackordered)
    assert events[0].expected_restock_date is None  # nothing inbound: we do not invent a date
    assert result.allocations == (alloc(1, "A", 3, "PAR"),)  # held, not announced


def test_fully_covered_order_is_allocated_complete_first_pass() -> None:
    received = order("o1", line(1, "A", 2), allow_partial=False)
    result = plan(domain.demands_of(received), [StockLevel("PAR", "A", 3)], WAREHOUSES)
    (event,) = domain.events_on_receipt(received, result, [], at=T0)
    assert isinstance(event, OrderAllocated)
    assert (event.complete, event.first_pass) == (True, True)


def test_nothing_available_is_backordered_only() -> None:
    received = order("o1", line(1, "A", 2))
    result = plan(domain.demands_of(received), [], WAREHOUSES)
    events = domain.events_on_receipt(received, result, [], at=T0)
    assert [type(e) for e in events] == [OrderBackordered]


def test_an_overdue_arrival_gives_no_date() -> None:
    inbound = [Inbound("PAR", "A", 10, date(2026, 3, 1)), Inbound("LYS", "A", 4, date(2026, 3, 9))]
    today = date(2026, 3, 2)
    # The 10 due on the 1st did not come: no promise on it; the 4 due on the 9th cover 2 units.
    assert domain.expected_restock_date([short(1, "A", 2)], inbound, today=today) == date(2026, 3, 9)
    assert domain.expected_restock_date([short(1, "A", 5)], inbound, today=today) is None
    assert domain.queue_restock_dates([short(1, "A", 4), short(1, "A", 1)], inbound, today=today) == [
        date(2026, 3, 9),
        None,
    ]
    # An arrival due today still counts.
    assert domain.expected_restock_date([short(1, "A", 2)], inbound, today=date(2026, 3, 1)) == date(2026, 3, 1)


def test_the_backordered_event_never_promises_a_day_that_has_passed() -> None:
    received = order("o1", line(1, "A", 5))  # received on T0 (2026-03-02)
    result = plan(domain.demands_of(received), [], WAREHOUSES)
    inbound = [Inbound("PAR", "A", 10, T0.date() - timedelta(days=3))]
    (event,) = domain.events_on_receipt(received, result, inbound, at=T0)
    assert isinstance(event, OrderBackordered)
    assert event.expected_restock_date is None


def test_expected_restock_date_is_the_latest_of_the_short_lines() -> None:
    inbound = [Inbound("PAR", "A", 10, date(2026, 3, 5)), Inbound("PAR", "B", 10, date(2026, 3, 20))]
    assert domain.expected_restock_date([short(1, "A", 2), short(2, "B", 1)], inbound) == date(2026, 3, 20)
    assert domain.expected_restock_date([short(1, "A", 2), short(2, "C", 1)], inbound) is None


# -- the backorder queue ---------------------------------------------------------------


def waiting(
    order_id: str, demand: Demand, *, tier: CustomerTier = STANDARD, minutes: int = 0, partial: bool = True
) -> WaitingOrder:
    return WaitingOrder(order_id, tier, partial, T0 + timedelta(minutes=minutes), (demand,))


def test_release_serves_core_customers_first_then_the_oldest_order() -> None:
    queue = [
        waiting("old-standard", Demand(1, "A", 2), minutes=0),
        waiting("new-core", Demand(1, "A", 2), tier=CORE, minutes=30),
        waiting("newer-standard", Demand(1, "A", 2), minutes=10),
    ]
    releases = domain.plan_releases(queue, [StockLevel("PAR", "A", 4)], WAREHOUSES)
    assert [r.order_id for r in releases] == ["new-core", "old-standard"]
    assert sorted(queue, key=domain.serving_key)[2].order_id == "newer-standard"


def test_a_ship_complete_order_at_the_head_holds_what_it_takes_and_cannot_starve() -> None:
    queue = [
        waiting("ship-complete", Demand(1, "A", 5), partial=False, minutes=0),
        waiting("partial-ok", Demand(1, "A", 5), partial=True, minutes=1),
    ]
    releases = domain.plan_releases(queue, [StockLevel("PAR", "A", 3)], WAREHOUSES)
    # Strict queue order: the 3 units go to the order ahead, which holds them (not complete yet).
    assert [(r.order_id, r.plan.allocations, r.plan.complete) for r in releases] == [
        ("ship-complete", (alloc(1, "A", 3, "PAR"),), False)
    ]
    # Next restock: it waits for 2 more only, gets them first, and is complete.
    rest = [waiting("ship-complete", Demand(1, "A", 2), partial=False), queue[1]]
    releases = domain.plan_releases(rest, [StockLevel("PAR", "A", 3 + 3, reserved=3)], WAREHOUSES)
    assert [(r.order_id, r.plan.units, r.plan.complete) for r in releases] == [
        ("ship-complete", 2, True),
        ("partial-ok", 1, False),
    ]


def test_release_never_gives_away_more_than_is_free() -> None:
    queue = [waiting(f"o{i}", Demand(1, "A", 2), minutes=i) for i in range(5)]
    releases = domain.plan_releases(queue, [StockLevel("PAR", "A", 7, reserved=2)], WAREHOUSES)
    assert [(r.order_id, sum(a.qty for a in r.plan.allocations)) for r in releases] == [
        ("o0", 2),
        ("o1", 2),
        ("o2", 1),
    ]


def test_release_respects_the_core_reserve() -> None:
    queue = [waiting("standard", Demand(1, "A", 3)), waiting("core", Demand(1, "A", 2), tier=CORE, minutes=5)]
    # 4 on hand, 2 held for core: core goes first and takes the 2 protected; the 2 left are anyone's.
    releases = domain.plan_releases(queue, [StockLevel("PAR", "A", 4, protected_for_core=2)], WAREHOUSES)
    assert [(r.order_id, r.plan.units) for r in releases] == [("core", 2), ("standard", 2)]
    # No core order waits: the standard order still cannot dig into the reserve.
    releases = domain.plan_releases(queue[:1], [StockLevel("PAR", "A", 4, protected_for_core=2)], WAREHOUSES)
    assert [(r.order_id, r.plan.units) for r in releases] == [("standard", 2)]
    # Core orders already hold 1 of the 2 protected units: 1 stays protected, 4 - 1 - 1 = 2 for standard.
    level = StockLevel("PAR", "A", 4, reserved=1, protected_for_core=2, reserved_for_core=1)
    releases = domain.plan_releases(queue[:1], [level], WAREHOUSES)
    assert [(r.order_id, r.plan.units) for r in releases] == [("standard", 2)]


def test_plan_of_and_still_wanted() -> None:
    demands = [Demand(1, "A", 5), Demand(2, "B", 1)]
    taken = [alloc(1, "A", 2, "PAR"), alloc(1, "A", 1, "PAR")]
    assert domain.still_wanted(demands, taken) == [Demand(1, "A", 2), Demand(2, "B", 1)]
    result = domain.plan_of(demands, taken)
    assert result.allocations == (alloc(1, "A", 3, "PAR"),)
    assert result.shortfalls == (short(1, "A", 2), short(2, "B", 1))


def test_expected_restock_date_counts_the_units_orders_ahead_wait_for() -> None:
    inbound = [Inbound("PAR", "A", 3, date(2026, 3, 5)), Inbound("LYS", "A", 4, date(2026, 3, 9))]
    assert domain.expected_restock_date([short(1, "A", 2)], inbound) == date(2026, 3, 5)
    # 2 units are already promised to orders ahead: the 5th brings only 1 for us.
    assert domain.expected_restock_date([short(1, "A", 2)], inbound, {"A": 2}) == date(2026, 3, 9)
    assert domain.expected_restock_date([short(1, "A", 2)], inbound, {"A": 6}) is None


def test_queue_restock_dates_follow_the_serving_order() -> None:
    inbound = [Inbound("PAR", "A", 3, date(2026, 3, 5)), Inbound("PAR", "A", 4, date(2026, 3, 9))]
    queue = [short(1, "A", 2), short(1, "B", 1), short(1, "A", 1), short(2, "A", 1), short(1, "A", 4)]
    assert domain.queue_restock_dates(queue, inbound) == [
        date(2026, 3, 5),
        None,
        date(2026, 3, 5),
        date(2026, 3, 9),
        None,
    ]
