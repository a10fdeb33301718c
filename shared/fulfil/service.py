"""What every service app has: lifespan (database, consumer, outbox relay, background
tasks), problem+json errors, the HTTP edge guard, /healthz, /readyz and /metrics.

A service's ``create_app(settings)`` calls ``create_service_app`` with its own routers,
handlers and tables; everything is built inside the lifespan, nothing at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fulfil import db
from fulfil.consumer import EventConsumer, Handlers
from fulfil.logs import configure_logging
from fulfil.outbox import WAKE_RELAY, OutboxRelay
from fulfil.problems import RequestGuard, install_problem_handlers
from fulfil.settings import ServiceSettings
from fulfil.shutdown import finish_within
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the lifespan built, reachable from routes as ``request.app.state.runtime``."""

    settings: ServiceSettings
    engine: AsyncEngine
    sessions: db.SessionFactory
    read_sessions: db.SessionFactory
    """For GET requests and reports: never queue behind the consumer's writes on SQLite."""
    relay: OutboxRelay
    consumer: EventConsumer | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    """Service-specific objects built at start-up (clocks, senders, ...)."""


BackgroundTask = Callable[[Runtime], Coroutine[Any, Any, None]]
StartupHook = Callable[[Runtime], Awaitable[None]]


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    """The dependency (async, so FastAPI does not hand it to a worker thread per request)."""
    return runtime_of(request)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A read session for GET and HEAD, a write session otherwise."""
    runtime = runtime_of(request)
    sessions = runtime.read_sessions if request.method in ("GET", "HEAD") else runtime.sessions
    async with sessions() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]


def create_service_app(
    settings: ServiceSettings,
    *,
    title: str,
    description: str,
    metadata: Sequence[MetaData] = (),
    handlers: Handlers | None = None,
    routers: Sequence[APIRouter] = (),
    background: Sequence[BackgroundTask] = (),
    on_startup: Sequence[StartupHook] = (),
    version: str = "0.1.0",
    openapi_tags: list[dict[str, Any]] | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.service_name, level=settings.log_level, json_lines=settings.log_json)
        engine = db.create_engine(settings.database)
        reader = engine
        relay: OutboxRelay | None = None
        runtime: Runtime | None = None
        try:
            await _create_tables(engine, metadata)
            sessions = db.session_factory(engine)
            reader = db.read_engine(settings.database, engine)
            relay = OutboxRelay(settings, sessions, reads=db.session_factory(reader))
            sessions.configure(info={WAKE_RELAY: relay.wake})
            consumer = EventConsumer(settings, sessions, handlers) if handlers else None
            runtime = Runtime(settings, engine, sessions, db.session_factory(reader), relay, consumer)
            app.state.runtime = runtime
            for hook in on_startup:
                await hook(runtime)
            runtime.tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
            if consumer is not None:
                runtime.tasks.append(asyncio.create_task(consumer.run(), name="consumer"))
            for start_task in background:
                name = getattr(start_task, "__name__", "background")
                runtime.tasks.append(asyncio.create_task(start_task(runtime), name=name))
            log.info("%s started on %s:%s", settings.service_name, settings.host, settings.port)
            yield
        finally:
            if runtime is not None:
                await _stop_tasks(runtime.tasks)
            for each in {reader, engine}:
                await _dispose(each)

    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan, openapi_tags=openapi_tags)
    install_problem_handlers(app)
    app.add_middleware(RequestGuard)
    app.include_router(health_router())
    for router in routers:
        app.include_router(router)
    return app


SHUTDOWN_GRACE_SECONDS = 15.0
"""How long background tasks get to finish after cancellation before the process goes on
without them: a client library stuck on a dead peer must not hold shutdown up forever."""


async def _stop_tasks(tasks: Sequence[asyncio.Task[None]], grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=grace)
    for task in stuck:
        log.error("background task %s did not stop within %.0f s; leaving it", task.get_name(), grace)
        task.print_stack(limit=8)


async def _dispose(engine: AsyncEngine, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
    if not await finish_within(engine.dispose(), grace):
        log.error("database connections did not close within %.0f s; leaving them", grace)


async def _create_tables(engine: AsyncEngine, metadata: Sequence[MetaData]) -> None:
    # Replicas starting together may race on CREATE TABLE; the loser retries and finds them.
    for attempt in range(5):
        try:
            await db.create_tables(engine, metadata)
            return
        except Exception:
            if attempt == 4:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))


def health_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """Ready: the database answers and the broker is reachable."""
        database, broker = await asyncio.gather(_database_ok(runtime.engine), _broker_ok(runtime))
        checks = {"database": database, "broker": broker}
        ready = all(checks.values())
        body = {"status": "ready" if ready else "unavailable", "checks": checks}
        headers = None if ready else {"Retry-After": "5"}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    @router.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


async def _database_ok(engine: AsyncEngine) -> bool:
    try:
        await asyncio.wait_for(db.ping(engine), 3)
    except Exception:
        return False
    return True


async def _broker_ok(runtime: Runtime) -> bool:
    producer = runtime.relay.producer
    if producer is None or (runtime.consumer is not None and not runtime.consumer.broker_ok):
        return False
    client = producer.client
    # Track our own topic, so the probe asks for one topic's metadata, not the whole cluster's.
    client.add_topic(runtime.settings.kafka_topic)
    try:
        return bool(await asyncio.wait_for(client.force_metadata_update(), 3))
    except Exception:
        return False
