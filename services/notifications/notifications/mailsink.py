"""The dev mail sink: with ENVIRONMENT=dev and no SMTP_URL, the service runs an aiosmtpd
server on loopback, sends its email there, and keeps the last messages in memory for
``GET /v1/dev/mailbox``. Laptops only: nothing here is durable, and that is the point."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

KEEP_MESSAGES = 500


@dataclass(frozen=True)
class SunkMessage:
    subject: str
    to: list[str]
    text: str
    html: str
    received_at: datetime
    mail_from: str
    message_id: str | None


class DevMailSink:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, keep: int = KEEP_MESSAGES) -> None:
        self.host = host
        self.port = port
        self.messages: deque[SunkMessage] = deque(maxlen=keep)
        self._server: asyncio.Server | None = None

    @property
    def smtp_url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # hostname given: aiosmtpd would otherwise ask DNS for this machine's FQDN.
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="localhost", enable_SMTPUTF8=True, loop=loop), self.host, self.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("dev mail sink listening on %s; see GET /v1/dev/mailbox", self.smtp_url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        """aiosmtpd calls this for each message it accepts."""
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        text, html = _bodies(message)
        self.messages.append(
            SunkMessage(
                subject=str(message.get("Subject", "")),
                to=[str(rcpt) for rcpt in envelope.rcpt_tos],
                text=text,
                html=html,
                received_at=datetime.now(UTC),
                mail_from=str(envelope.mail_from or ""),
                message_id=message.get("Message-ID"),
            )
        )
        return "250 OK"


def _bodies(message: EmailMessage) -> tuple[str, str]:
    def content(preference: str) -> str:
        part: Any = message.get_body(preferencelist=(preference,))
        return str(part.get_content()) if part is not None else ""

    return content("plain"), content("html")
