"""SSRF: the address a webhook connects to is vetted at connect time.

A canary listens on one port at 127.0.0.1, 127.0.0.2 and [::1], so every loopback
spelling (localhost, 0.0.0.0, ::ffff:127.0.0.1, 127.0.0.2, [::1]) and every DNS name or
redirect that leads to loopback would reach it; each such case has a control showing
that an unvetted client does reach it, so "nothing reached the canary" means something.
Private, link-local and metadata addresses cannot be listened on here: for those the
assertion is the refusal itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from notifications.webhooks import AddressRefused, VettedTransport, webhook_client
from notifications_support import Canary, Receiver, run_receiver


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    listener = Canary()
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


async def quiet(canary: Canary) -> None:
    await asyncio.sleep(0.05)
    assert canary.connections == 0


LOOPBACK_SPELLINGS = [
    "https://127.0.0.1:{port}/hook",
    "http://127.0.0.1:{port}/hook",
    "https://127.0.0.2:{port}/hook",
    "https://localhost:{port}/hook",  # a hostname: passes registration, refused when it resolves to loopback
    "https://[::ffff:127.0.0.1]:{port}/hook",
    "https://[::1]:{port}/hook",
    "https://0.0.0.0:{port}/hook",
]


@pytest.mark.parametrize("template", LOOPBACK_SPELLINGS)
async def test_production_policy_refuses_loopback_in_every_spelling(canary: Canary, template: str) -> None:
    async with webhook_client(allow_loopback=False, timeout=2) as client:
        with pytest.raises(AddressRefused):
            await client.post(template.format(port=canary.port), content=b"{}")
    await quiet(canary)


@pytest.mark.parametrize("template", LOOPBACK_SPELLINGS)
async def test_control_an_unvetted_client_does_reach_the_canary_at_each_spelling(canary: Canary, template: str) -> None:
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        with pytest.raises(httpx.HTTPError):  # the canary hangs up (and speaks no TLS)
            await client.post(template.format(port=canary.port), content=b"{}")
    assert canary.connections >= 1


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.7/hook",
        "https://192.168.0.10/hook",
        "https://172.16.5.5/hook",
        "https://[fe80::1]/hook",
        "https://[fd00::7]/hook",
        "https://[::ffff:10.0.0.7]/hook",
        "https://100.64.0.1/hook",
    ],
)
async def test_production_policy_refuses_private_link_local_and_metadata_addresses(url: str) -> None:
    async with webhook_client(allow_loopback=False, timeout=2) as client:
        with pytest.raises(AddressRefused):
            await client.post(url, content=b"{}")


class FakeDns:
    """Names that resolve where an attacker points them."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    async def __call__(self, host: str, port: int) -> list[str]:
        return self.records[host]


DNS = FakeDns(
    {
        "rebound.example.com": ["127.0.0.1"],
        "also-public.example.com": ["93.184.215.14", "127.0.0.1"],
        "v6.example.com": ["::1"],
        "metadata.example.com": ["169.254.169.254"],
    }
)


@pytest.mark.parametrize(
    "host", ["rebound.example.com", "also-public.example.com", "v6.example.com", "metadata.example.com"]
)
async def test_a_name_that_resolves_to_an_internal_address_is_refused_at_connect_time(
    canary: Canary, host: str
) -> None:
    transport = VettedTransport(allow_loopback=False, resolver=DNS)
    async with httpx.AsyncClient(transport=transport, timeout=2) as client:
        with pytest.raises(AddressRefused, match=host):
            await client.post(f"https://{host}:{canary.port}/hook", content=b"{}")
    await quiet(canary)


async def test_control_the_fake_dns_does_lead_to_the_canary(canary: Canary) -> None:
    transport = VettedTransport(allow_loopback=True, resolver=DNS)
    async with httpx.AsyncClient(transport=transport, timeout=2) as client:
        for host in ("rebound.example.com", "v6.example.com"):
            with pytest.raises(httpx.HTTPError):
                await client.post(f"https://{host}:{canary.port}/hook", content=b"{}")
    assert canary.connections == 2


@pytest.fixture
def redirector() -> Iterator[Receiver]:
    yield from run_receiver(Receiver(statuses=[307]))


async def test_a_redirect_to_the_canary_is_not_followed(canary: Canary, redirector: Receiver) -> None:
    redirector.headers = {"Location": f"http://127.0.0.1:{canary.port}/steal"}
    async with webhook_client(allow_loopback=True, timeout=2) as client:
        response = await client.post(redirector.url, content=b"{}")
    assert response.status_code == 307
    await quiet(canary)
    # Control: a client that follows redirects does end up at the canary.
    async with httpx.AsyncClient(timeout=2, trust_env=False, follow_redirects=True) as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(redirector.url, content=b"{}")
    assert canary.connections == 1


@pytest.mark.parametrize(
    "template",
    [
        "https://[::ffff:127.0.0.1]:{port}/hook",
        "http://10.0.0.7:{port}/hook",
        "https://169.254.169.254/latest/meta-data/",
        "ftp://127.0.0.1:{port}/hook",
    ],
)
async def test_dev_allowance_is_plain_loopback_only(canary: Canary, template: str) -> None:
    async with webhook_client(allow_loopback=True, timeout=2) as client:
        with pytest.raises((AddressRefused, httpx.UnsupportedProtocol)):
            await client.post(template.format(port=canary.port), content=b"{}")
    await quiet(canary)


async def test_the_canary_does_hear_an_allowed_connection(canary: Canary) -> None:
    """Control: the vetted client itself reaches the canary where the policy allows it."""
    async with webhook_client(allow_loopback=True, timeout=2) as client:
        for url in (f"http://127.0.0.1:{canary.port}/hook", f"http://[::1]:{canary.port}/hook"):
            with pytest.raises(httpx.HTTPError):
                await client.post(url, content=b"{}")
    assert canary.connections == 2


async def test_a_host_that_does_not_resolve_is_a_connect_error_not_a_socket_error() -> None:
    async with webhook_client(allow_loopback=False, timeout=2) as client:
        with pytest.raises(httpx.ConnectError, match="does not resolve"):
            await client.post("https://no-such-host.invalid/hook", content=b"{}")
