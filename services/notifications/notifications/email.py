"""Email channel: SMTP through aiosmtplib to SMTP_URL."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib


class EmailSender(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class PermanentEmailFailure(Exception):
    """The mail server refused for good (5xx): retrying will not help."""


def build_message(*, sender: str, recipient: str, subject: str, text: str, html: str, message_id: str) -> EmailMessage:
    """Text with an HTML alternative; the Message-ID is stable per delivery so resends can be spotted."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = f"<{message_id}@fulfil.notifications>"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


class SmtpSender:
    def __init__(self, smtp_url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(smtp_url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"SMTP_URL must be smtp://host:port or smtps://host:port, not {smtp_url!r}")
        self.hostname = parts.hostname
        self.implicit_tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout

    async def send(self, message: EmailMessage) -> None:
        """One attempt, within ``timeout`` overall (aiosmtplib's own timeout is per command)."""
        try:
            async with asyncio.timeout(self.timeout):
                await aiosmtplib.send(
                    message,
                    hostname=self.hostname,
                    port=self.port,
                    username=self.username,
                    password=self.password,
                    use_tls=self.implicit_tls,
                    start_tls=None,  # upgrade when the server offers STARTTLS
                    timeout=self.timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise PermanentEmailFailure(str(exc)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:
                raise PermanentEmailFailure(f"{exc.code} {exc.message}") from exc
            raise
