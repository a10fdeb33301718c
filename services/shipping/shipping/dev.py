"""`fulfil dev` hook: where shipping's operational views and carrier webhooks are."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def hook(*, urls: dict[str, str], data_dir: Path, console: Console) -> None:
    shipping = urls.get("shipping", "http://127.0.0.1:8003")
    console.print(
        f"  shipments waiting for dispatch: {shipping}/v1/shipments?status=pending · "
        f"carrier webhooks: POST {shipping}/v1/carriers/<carrier>/events",
        soft_wrap=True,
        highlight=False,
    )
