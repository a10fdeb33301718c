"""A steady stream of orders from an ERP client, in a thread, that rides out faults the way a
well-behaved client does: the same Idempotency-Key on every retry, retrying connection
errors (a service restarting) and 503 after Retry-After, refusing to paper over anything else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.flows import bearer
from tests.support.stack import CallLog


@dataclass(frozen=True)
class Accepted:
    index: int
    order_id: str
    body: dict[str, Any]
    attempts: int
    seconds: float
    """From the first attempt to the answer that accepted it."""


@dataclass
class OrderStream:
    """Posts ``make_order(i)`` for i = 0, 1, ... at ``rate`` per second until ``limit`` orders
    were accepted or ``stop()`` is called. Each order is retried until accepted (at most
    ``give_up_after`` seconds): with its Idempotency-Key, a retry of an order that was
    committed before the answer was lost gets the stored answer, so no order is placed twice."""

    intake: str
    key: str
    make_order: Callable[[int], dict[str, Any]]
    calls: CallLog
    rate: float = 2.5
    limit: int = 200
    give_up_after: float = 90.0
    accepted: list[Accepted] = field(default_factory=list)
    retries: int = 0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="order-stream", daemon=True)
        self._thread.start()

    def stop(self) -> list[Accepted]:
        """Stop after the order in hand is accepted; re-raise what went wrong in the thread."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.give_up_after + 30)
        assert not self._thread.is_alive(), "the order stream did not stop"
        if self.error is not None:
            raise self.error
        return list(self.accepted)

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            if self.error is not None:
                raise self.error
            assert time.monotonic() < deadline, f"only {len(self.accepted)} of {count} orders accepted in time"
            time.sleep(0.1)

    def _run(self) -> None:
        try:
            with self.calls.client(timeout=45) as http:
                due = time.monotonic()
                for index in range(self.limit):
                    if self._stop.is_set():
                        return
                    body = self.make_order(index)
                    began = time.monotonic()
                    order_id, attempts = self._place(http, body)
                    self.accepted.append(Accepted(index, order_id, body, attempts, time.monotonic() - began))
                    due += 1 / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def _place(self, http: httpx.Client, body: dict[str, Any]) -> tuple[str, int]:
        headers = {**bearer(self.key), "Idempotency-Key": body["external_ref"]}
        deadline = time.monotonic() + self.give_up_after
        attempts = 0
        while True:
            attempts += 1
            assert time.monotonic() < deadline, f"order {body['external_ref']} not accepted in {self.give_up_after}s"
            try:
                response = http.post(f"{self.intake}/v1/orders", json=body, headers=headers)
            except httpx.TransportError as exc:
                self.calls.connection_errors.append(("POST", f"{self.intake}/v1/orders", repr(exc)))
                self.retries += 1
                time.sleep(0.5)
                continue
            if response.status_code == 201:
                return str(response.json()["order_id"]), attempts
            if response.status_code == 409 and "order_id" in response.json():
                return str(response.json()["order_id"]), attempts  # placed by an earlier attempt
            # 503: a dependency is away; 429: throttled; 409 without order_id: the key is still in flight.
            if response.status_code in (409, 429, 503) and response.headers.get("retry-after"):
                self.retries += 1
                time.sleep(min(1.0, float(response.headers["retry-after"])))
                continue
            raise AssertionError(f"order {body['external_ref']}: {response.status_code} {response.text}")
