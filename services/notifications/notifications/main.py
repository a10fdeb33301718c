"""The notifications app: `uvicorn notifications.main:create_app --factory`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
from fastapi import FastAPI
from fulfil.service import Runtime, create_service_app

from notifications.config import Settings
from notifications.delivery import DeliveryWorker, Jitter, random_jitter
from notifications.email import EmailSender, SmtpSender
from notifications.handlers import HANDLERS
from notifications.mailsink import DevMailSink
from notifications.models import NotificationsTable
from notifications.routes import dev_router, router
from notifications.service import WAKE_DELIVERY_WORKER, Clock
from notifications.webhooks import webhook_client


def utc_now() -> datetime:
    return datetime.now(UTC)


class NoMailServer:
    """ENVIRONMENT=test without SMTP_URL: every email attempt fails visibly (and is retried)."""

    async def send(self, message: object) -> None:
        raise RuntimeError("SMTP_URL is not set")


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = utc_now,
    email_sender: EmailSender | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    jitter: Jitter = random_jitter,
    run_worker: bool = True,
) -> FastAPI:
    """``clock``, ``email_sender``, ``http_transport`` and ``jitter`` are for tests."""
    settings = settings or Settings()

    async def start(runtime: Runtime) -> None:
        runtime.extras["clock"] = clock
        sender = email_sender
        if settings.dev_mail_sink:
            sink = DevMailSink(port=settings.dev_mail_sink_port)
            await sink.start()
            runtime.extras["mail_sink"] = sink
            sender = sender or SmtpSender(sink.smtp_url, timeout=settings.smtp_timeout_seconds)
        elif settings.smtp_url is not None:
            sender = sender or SmtpSender(settings.smtp_url, timeout=settings.smtp_timeout_seconds)
        http = webhook_client(
            allow_loopback=settings.allow_loopback_webhooks,
            timeout=settings.webhook_timeout_seconds,
            transport=http_transport,
        )
        runtime.extras["http"] = http
        worker = DeliveryWorker(
            settings,
            runtime.sessions,
            clock=clock,
            http=http,
            email=sender or NoMailServer(),
            jitter=jitter,
        )
        runtime.extras["worker"] = worker
        # A commit that queued deliveries wakes the worker: no poll interval between event and send.
        info = dict(runtime.sessions.kw.get("info") or {})
        runtime.sessions.configure(info={**info, WAKE_DELIVERY_WORKER: worker.wake})

    async def delivery_worker(runtime: Runtime) -> None:
        worker: DeliveryWorker = runtime.extras["worker"]
        try:
            if run_worker:
                await worker.run()
            else:  # tests drive worker.run_once() themselves; keep the client open until shutdown
                await asyncio.Event().wait()
        finally:
            await runtime.extras["http"].aclose()
            sink: DevMailSink | None = runtime.extras.get("mail_sink")
            if sink is not None:
                await sink.stop()

    return create_service_app(
        settings,
        title="fulfil notifications",
        description="Tells customers about their orders by signed webhook and email: exactly once, in their language.",
        metadata=[NotificationsTable.metadata],
        handlers=HANDLERS,
        routers=[router, dev_router] if settings.dev_mail_sink else [router],
        background=[delivery_worker],
        on_startup=[start],
    )
