"""`fulfil dev` hook: a dev client with a fresh key, printed once the stack is up."""

from __future__ import annotations

from pathlib import Path

import httpx
from rich.console import Console

from order_intake.cli import dev_database_url, issue_dev_key, shown

DEV_CLIENT = "dev"


def hook(*, urls: dict[str, str], data_dir: Path, console: Console) -> None:
    """Only the key's hash is stored, so each start issues the dev client a new key, in the
    database the running order-intake uses; the running service is asked to confirm it."""
    database = dev_database_url(data_dir)
    _, key = issue_dev_key(database, DEV_CLIENT)
    base = urls.get("order-intake", "http://127.0.0.1:8001")
    if accepted_by(base, key) is False:
        console.print(
            f"[yellow]  the order-intake at {base} refuses the dev key written to {shown(database)}: "
            "it runs on another database (is DATABASE_URL_ORDER_INTAKE the same as when it started?)[/yellow]",
            soft_wrap=True,
            highlight=False,
        )
    console.print(f"  order-intake dev client key: {key}", soft_wrap=True, highlight=False)
    console.print(f"    curl -H 'Authorization: Bearer {key}' {base}/v1/orders", soft_wrap=True, highlight=False)


def accepted_by(base: str, key: str) -> bool | None:
    """Whether the service at ``base`` accepts ``key``; None when it cannot be asked."""
    try:
        response = httpx.get(
            f"{base}/v1/orders", params={"limit": 1}, headers={"Authorization": f"Bearer {key}"}, timeout=3.0
        )
    except httpx.HTTPError:
        return None
    if response.status_code == 401:
        return False
    return True if response.status_code == 200 else None
