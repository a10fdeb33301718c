"""What the outside world does to a running stack, over HTTP only: an ERP client placing
orders, a stockroom, a warehouse dispatching, a carrier posting signed tracking events."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal, TypeVar

import httpx

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
    state: Callable[[], object] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` seconds,
    saying what was awaited and, from ``state()``, how far things got."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            seen = state() if state is not None else result
            raise AssertionError(f"{what}: not within {timeout:g}s (last: {seen!r})")
        time.sleep(interval)


def ok(response: httpx.Response, *statuses: int) -> Any:
    """The JSON body of a response with one of ``statuses`` (default 2xx); fail with the body otherwise."""
    good = response.status_code in statuses if statuses else response.is_success
    assert good, f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}"
    return response.json() if response.content else None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def order_body(
    external_ref: str,
    customer_id: str,
    lines: list[tuple[str, int]],
    *,
    placed_at: datetime | None = None,
    tier: str = "standard",
    email: str | None = None,
    locale: str = "en",
    allow_partial: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "external_ref": external_ref,
        "customer": {"id": customer_id, "tier": tier, "locale": locale, **({"email": email} if email else {})},
        "lines": [{"line_no": n, "sku": sku, "qty": qty} for n, (sku, qty) in enumerate(lines, start=1)],
        "ship_to": {
            "name": customer_id,
            "line1": "1 Century Avenue",
            "city": "Shanghai",
            "postal_code": "200120",
            "country": "CN",
        },
        "allow_partial": allow_partial,
    }
    if placed_at is not None:
        body["placed_at"] = placed_at.isoformat()
    return body


def subscribe_webhook(client: httpx.Client, notifications: str, customer_id: str, url: str) -> str:
    """The customer's webhook endpoint, through notifications' preferences API; its signing secret."""
    preferences = ok(client.put(f"{notifications}/v1/customers/{customer_id}/preferences", json={"webhook_url": url}))
    secret = str(preferences["webhook_secret"])
    assert secret.startswith("whsec_")
    return secret


def carrier_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """A carrier's webhook signature as shipping documents it: ``sha256=`` + hex HMAC-SHA256 of
    ``timestamp + "." + raw body`` (written out here, not imported, so the contract is tested)."""
    timestamp = str(int(now if now is not None else time.time()))
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "X-Carrier-Timestamp": timestamp,
        "X-Carrier-Signature": f"sha256={digest}",
        "Content-Type": "application/json",
    }


def post_carrier_event(
    client: httpx.Client, shipping: str, carrier: str, secret: str, event: dict[str, Any]
) -> dict[str, Any]:
    body = json.dumps(event).encode()
    response = client.post(
        f"{shipping}/v1/carriers/{carrier}/events", content=body, headers=carrier_headers(secret, body)
    )
    result: dict[str, Any] = ok(response)
    return result


def shipments(client: httpx.Client, shipping: str, **query: Any) -> list[dict[str, Any]]:
    """Every shipment matching the query, following the pages."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 500, **query, **({"cursor": cursor} if cursor else {})}
        page = ok(client.get(f"{shipping}/v1/shipments", params=params))
        found.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return found


def orders(client: httpx.Client, intake: str, key: str, **query: Any) -> Iterator[dict[str, Any]]:
    """Every order of the client, following the pages."""
    cursor: str | None = None
    while True:
        params = {"limit": 200, **query, **({"cursor": cursor} if cursor else {})}
        page = ok(client.get(f"{intake}/v1/orders", params=params, headers=bearer(key)))
        yield from page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return


def kpi_values(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A KPI summary's rates as {kpi: (numerator, denominator)}."""
    return {k["kpi"]: (k["numerator"], k["denominator"]) for k in report["kpis"]}
