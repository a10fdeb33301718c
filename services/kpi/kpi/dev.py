"""`fulfil dev` hook: where the ops dashboard is, printed once the stack is up."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def hook(*, urls: dict[str, str], data_dir: Path, console: Console) -> None:
    base = urls.get("kpi", "http://127.0.0.1:8005")
    console.print(f"  KPI dashboard: {base}/  (live stream {base}/v1/stream)", soft_wrap=True, highlight=False)
