"""HTTP API of order-intake (/v1): thin routes over the use cases in ``service``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fulfil.problems import PROBLEM_BASE, Conflict, NotFound, Problem
from fulfil.service import Runtime, SessionDep
from starlette.types import ASGIApp, Receive, Scope, Send

from order_intake import domain, service
from order_intake.commits import GroupCommit, OrderToAccept, accept_batch
from order_intake.config import Settings
from order_intake.domain import OrderStatus, TokenBucket
from order_intake.models import (
    ACCEPTANCE_CLOCK,
    NUL_FREE,
    ORDER_ID_EXAMPLE,
    ApiClient,
    BatchRequest,
    BatchResult,
    CancelAccepted,
    CancelRequest,
    NoNul,
    OrderAccepted,
    OrderCreate,
    OrderDetail,
    OrderPage,
    ProblemDetails,
)
from order_intake.service import (
    Clock,
    ServiceUnavailable,
    StoredResponse,
    TooManyRequests,
    Unauthorized,
    ValidationProblem,
)


class RateLimiter:
    """One token bucket per client, in this process (each replica limits on its own)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.buckets: dict[str, TokenBucket] = {}

    def wait_for(self, client_id: str, now: float) -> float:
        bucket = self.buckets.get(client_id)
        if bucket is None:
            bucket = self.buckets[client_id] = TokenBucket.full(self.rate, self.burst, now)
        return bucket.take(now)


class KnownKeys:
    """Clients by the hash of their key, remembered for a few seconds so that most requests need
    no database read to authenticate. A rotated key keeps working that long in each process."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.clients: dict[str, tuple[ApiClient, float]] = {}

    def get(self, key_hash: str, now: float) -> ApiClient | None:
        known = self.clients.get(key_hash)
        if known is None or known[1] <= now:
            return None
        return known[0]

    def remember(self, key_hash: str, client: ApiClient, now: float) -> None:
        if self.seconds > 0:
            if len(self.clients) > 10_000:  # only valid keys get here, but keep it bounded anyway
                self.clients = {h: known for h, known in self.clients.items() if known[1] > now}
            self.clients[key_hash] = (client, now + self.seconds)


def _example(problem: Problem, instance: str = "/v1/orders") -> dict[str, Any]:
    return service.problem_body(problem, instance)


PROBLEM_EXAMPLES: dict[int, dict[str, Any]] = {
    400: {
        "type": PROBLEM_BASE + "malformed-json",
        "title": "Malformed JSON",
        "status": 400,
        "detail": "the request body is not valid JSON",
        "instance": "/v1/orders",
    },
    401: _example(Unauthorized("the API key is not valid")),
    404: _example(NotFound(f"no order {ORDER_ID_EXAMPLE}"), f"/v1/orders/{ORDER_ID_EXAMPLE}"),
    409: _example(service.duplicate_order("SO-2026-000123", ORDER_ID_EXAMPLE)),
    413: {
        "type": "about:blank",
        "title": "Content Too Large",
        "status": 413,
        "detail": "request bodies are limited to 1048576 bytes",
        "instance": "/v1/orders",
    },
    415: {
        "type": "about:blank",
        "title": "Unsupported Media Type",
        "status": 415,
        "detail": "send the body as application/json",
        "instance": "/v1/orders",
    },
    422: _example(
        ValidationProblem(
            "2 invalid field(s)",
            errors=[
                {
                    "pointer": "/lines/0/qty",
                    "location": "body",
                    "detail": "Input should be greater than or equal to 1",
                    "code": "greater_than_equal",
                },
                {
                    "pointer": "/lines/1/line_no",
                    "location": "body",
                    "detail": "line_no 1 is already used by /lines/0",
                    "code": "duplicate_line_no",
                },
            ],
        )
    ),
    429: _example(TooManyRequests("rate limit of 1000 requests/s exceeded; retry in 1 s")),
    503: _example(ServiceUnavailable("the order database is unavailable; retry shortly")),
}


def _problem(description: str, status: int, example: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "model": ProblemDetails,
        "content": {
            "application/problem+json": {
                "schema": {"$ref": "#/components/schemas/ProblemDetails"},
                "example": example or PROBLEM_EXAMPLES[status],
            }
        },
    }


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _problem("missing or unknown API key", 401),
    429: _problem("rate limit exceeded; see Retry-After", 429),
}
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem("malformed JSON", 400),
    413: _problem("body larger than 1 MiB", 413),
    415: _problem("body is not application/json", 415),
    422: _problem("invalid fields, each with its JSON pointer", 422),
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: _problem("the database is unavailable or the service is stopping; retry after Retry-After", 503)
}

bearer = HTTPBearer(auto_error=False, description="The client's API key")


@dataclass(frozen=True)
class IntakeContext:
    """What the routes need of the running service, built once at start-up (``runtime.extras``)
    and handed to a route as one dependency: FastAPI's cost grows with every dependency."""

    runtime: Runtime
    settings: Settings
    clock: Clock
    group_commit: GroupCommit
    rate_limiter: RateLimiter
    known_keys: KnownKeys


INTAKE = "intake"


async def intake_of(request: Request) -> IntakeContext:
    # async def: FastAPI would run a plain def dependency in a worker thread, a thread hop per request.
    intake: IntakeContext = request.app.state.runtime.extras[INTAKE]
    return intake


IntakeDep = Annotated[IntakeContext, Depends(intake_of)]


class AcceptanceClockMiddleware:
    """Body validation checks placed_at against the app's clock (a fake one in tests): set it
    for the request before any route runs."""

    def __init__(self, app: ASGIApp, *, clock: Clock) -> None:
        self.app = app
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = ACCEPTANCE_CLOCK.set(self.clock)
        try:
            await self.app(scope, receive, send)
        finally:
            ACCEPTANCE_CLOCK.reset(token)


async def current_client(
    intake: IntakeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> ApiClient:
    """The calling client, from its bearer key; throttled by its token bucket."""
    challenge = {"WWW-Authenticate": 'Bearer realm="fulfil"'}
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("send the client's API key as 'Authorization: Bearer <key>'", headers=challenge)
    key_hash = service.hash_key(credentials.credentials)
    client = intake.known_keys.get(key_hash, time.monotonic())
    if client is None:
        async with intake.runtime.read_sessions() as session:
            client = await service.authenticate(session, credentials.credentials)
        if client is None:
            raise Unauthorized("the API key is not valid", headers=challenge)
        intake.known_keys.remember(key_hash, client, time.monotonic())
    limiter = intake.rate_limiter
    wait = limiter.wait_for(client.id, intake.clock().timestamp())
    if wait > 0:
        seconds = domain.retry_after_seconds(wait)
        raise TooManyRequests(
            f"rate limit of {limiter.rate:g} requests/s exceeded; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    return client


ClientDep = Annotated[ApiClient, Depends(current_client)]

router = APIRouter(prefix="/v1", tags=["orders"], responses=AUTH_RESPONSES)


NulFree = Annotated[str, NoNul]
OrderId = Annotated[
    NulFree, Path(description="as returned when the order was accepted", json_schema_extra={"pattern": NUL_FREE})
]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=257,
        pattern=r"^[ -~]+$",
        description="Retry safely: same key, same body, same answer. Printable ASCII, bare or as a quoted string.",
        examples=["8e03978e-40d5-43e8-bc93-6894a57f9324"],
    ),
]


def _replay(stored: StoredResponse) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true", **stored.headers}
    if stored.location:
        headers["Location"] = stored.location
    return JSONResponse(stored.body, stored.status_code, headers=headers, media_type=stored.media_type)


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderAccepted,
    responses={
        **BODY_RESPONSES,
        409: _problem("duplicate external_ref (names order_id) or Idempotency-Key still in flight", 409),
        **UNAVAILABLE,
    },
)
async def create_order(
    body: OrderCreate,
    request: Request,
    response: Response,
    intake: IntakeDep,
    client: ClientDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Accept one order; 201 means it and its order.received event are committed."""
    key = None
    if idempotency_key is not None:
        key = service.idempotency_key(client.id, idempotency_key, await request.body())
    outcome = await intake.group_commit.accept(OrderToAccept(client, body, intake.clock(), key, request.scope["path"]))
    if isinstance(outcome, StoredResponse):
        return _replay(outcome)
    response.headers["Location"] = outcome.links.self
    return outcome


@router.post("/orders/batch", status_code=207, response_model=BatchResult, responses={**BODY_RESPONSES, **UNAVAILABLE})
async def create_orders_batch(body: BatchRequest, intake: IntakeDep, client: ClientDep) -> BatchResult:
    """Accept up to 1,000 orders; each item is created, a duplicate (with its order_id) or invalid."""
    return await accept_batch(intake.group_commit, client, body.orders, intake.clock())


INVALID_CURSOR = _example(Problem("the cursor is not one this API returned", title="Invalid cursor"))
NUL_FREE_SCHEMA = {"pattern": NUL_FREE}


@router.get(
    "/orders",
    response_model=OrderPage,
    responses={400: _problem("invalid cursor", 400, INVALID_CURSOR), 422: _problem("bad query", 422)},
)
async def list_orders(
    session: SessionDep,
    client: ClientDep,
    external_ref: Annotated[NulFree | None, Query(max_length=100, json_schema_extra=NUL_FREE_SCHEMA)] = None,
    customer_id: Annotated[NulFree | None, Query(max_length=100, json_schema_extra=NUL_FREE_SCHEMA)] = None,
    status: OrderStatus | None = None,
    since: Annotated[datetime | None, Query(description="orders received at or after this time")] = None,
    cursor: Annotated[NulFree | None, Query(max_length=500, json_schema_extra=NUL_FREE_SCHEMA)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> OrderPage:
    """The client's orders, oldest received first, filtered, one page per call."""
    if since is not None and since.tzinfo is None:
        raise Problem("since must carry a UTC offset, e.g. 2026-11-22T08:00:00Z", title="Invalid query")
    return await service.list_orders(
        session,
        client,
        external_ref=external_ref,
        customer_id=customer_id,
        status=status,
        since=since,
        cursor=cursor,
        limit=limit,
    )


@router.get(
    "/orders/{order_id}",
    response_model=OrderDetail,
    responses={404: _problem("no such order", 404), 422: _problem("order_id is not text", 422)},
)
async def get_order(order_id: OrderId, session: SessionDep, client: ClientDep) -> OrderDetail:
    """The order, its current status and its timeline of everything that happened to it."""
    return await service.order_detail(session, client, order_id)


SHIPPED_EXAMPLE = _example(
    Conflict(
        f"order {ORDER_ID_EXAMPLE} has shipped completely (shipped); it can no longer be cancelled",
        order_id=ORDER_ID_EXAMPLE,
        status_now="shipped",
    ),
    f"/v1/orders/{ORDER_ID_EXAMPLE}/cancel",
)


@router.post(
    "/orders/{order_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    responses={
        **BODY_RESPONSES,
        404: _problem("no such order", 404),
        409: _problem("everything has shipped", 409, SHIPPED_EXAMPLE),
    },
)
async def cancel_order(
    order_id: OrderId,
    body: CancelRequest,
    session: SessionDep,
    intake: IntakeDep,
    client: ClientDep,
) -> CancelAccepted:
    """Cancel what has not shipped yet; 202 with order.cancelled staged."""
    return await service.cancel_order(session, intake.settings, client, order_id, body.reason, intake.clock())
