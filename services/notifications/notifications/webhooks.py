"""Webhook transport: Standard Webhooks signing and an HTTP client that vets the address
it actually connects to (SSRF), not just the one registered."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import secrets
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime

import httpcore
import httpx
from httpcore._backends.anyio import AnyIOBackend
from standardwebhooks import Webhook

from notifications.domain import address_refusal, is_loopback_host

SECRET_BYTES = 32

# httpcore tries ``import sniffio`` for every lock it sets up (several per request). Without
# sniffio installed, each failed import walks all of sys.path (about a millisecond here);
# a None entry makes the same import fail at once, as the import system documents.
if importlib.util.find_spec("sniffio") is None:
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


class AddressRefused(Exception):
    """The webhook would reach an address it must not (loopback, private, metadata...)."""


def new_signing_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def signed_headers(secret: str, webhook_id: str, sent_at: datetime, body: str) -> dict[str, str]:
    """webhook-id, webhook-timestamp and ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    signature = Webhook(secret).sign(msg_id=webhook_id, timestamp=sent_at, data=body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "fulfil-notifications/0.1",
    }


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""host, port -> the IP addresses it resolves to (a fake one in tests)."""


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class VettedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself, refuses if any address is off limits, then connects to
    the vetted IP, so DNS cannot swap in another address between check and connect."""

    def __init__(self, *, allow_loopback: bool, resolver: Resolver = resolve) -> None:
        self.allow_loopback = allow_loopback
        self.resolver = resolver
        self._backend = AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:  # socket.gaierror: a DNS failure is a failed connect, worth a retry
            raise httpcore.ConnectError(f"{host} does not resolve: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve")
        for address in addresses:
            refusal = address_refusal(address, allow_loopback=self.allow_loopback)
            if refusal is not None:
                raise AddressRefused(f"{host} resolves to {refusal}")
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # every one vetted above; the next is tried when one does not answer
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("webhooks never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class VettedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose every connection goes through ``VettedBackend``; plain
    http only to a loopback host and only when loopback is allowed (dev, test)."""

    def __init__(
        self, *, allow_loopback: bool, ssl_context: ssl.SSLContext | None = None, resolver: Resolver = resolve
    ) -> None:
        super().__init__()
        self.allow_loopback = allow_loopback
        # Replace the default pool with one on our backend (httpx offers no public hook for it).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=100,
            keepalive_expiry=5.0,
            network_backend=VettedBackend(allow_loopback=allow_loopback, resolver=resolver),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        loopback_http = request.url.scheme == "http" and self.allow_loopback and is_loopback_host(request.url.host)
        if request.url.scheme != "https" and not loopback_http:
            raise AddressRefused(f"{request.url.scheme}:// is refused; webhooks use https")
        return await super().handle_async_request(request)


def webhook_client(
    *, allow_loopback: bool, timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client that posts webhooks: vetted addresses, no redirects, no proxies from the environment."""
    return httpx.AsyncClient(
        transport=transport or VettedTransport(allow_loopback=allow_loopback),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
    )
