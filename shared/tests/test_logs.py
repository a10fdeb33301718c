from __future__ import annotations

import json
import logging

from fulfil.logs import JsonFormatter, ce_id_var, order_id_var


def test_log_lines_are_json_with_service_order_and_event() -> None:
    formatter = JsonFormatter("inventory")
    record = logging.LogRecord("inventory.handlers", logging.WARNING, __file__, 1, "short of %s", ("SKU-1",), None)
    record.warehouse_id = "w-1"
    order_token, ce_token = order_id_var.set("o-9"), ce_id_var.set("ce-1")
    try:
        line = json.loads(formatter.format(record))
    finally:
        order_id_var.reset(order_token)
        ce_id_var.reset(ce_token)
    assert line["service"] == "inventory"
    assert line["level"] == "warning"
    assert line["msg"] == "short of SKU-1"
    assert line["order_id"] == "o-9"
    assert line["ce_id"] == "ce-1"
    assert line["warehouse_id"] == "w-1"
    assert line["ts"].endswith("+00:00")


def test_lines_outside_an_event_carry_no_order() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "started", (), None)
    assert "order_id" not in json.loads(JsonFormatter("kpi").format(record))
