"""`fulfil dev` hook: where the email the dev mail sink caught can be read."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console


def hook(*, urls: dict[str, str], data_dir: Path, console: Console) -> None:
    if smtp_url := os.environ.get("SMTP_URL"):
        relay = urlsplit(smtp_url)  # never print the credentials it may carry
        console.print(f"  Email goes to {relay.hostname}:{relay.port} (SMTP_URL)", soft_wrap=True, highlight=False)
        return
    base = urls.get("notifications", "http://127.0.0.1:8004")
    console.print(f"  Email caught by the dev mail sink: {base}/v1/dev/mailbox", soft_wrap=True, highlight=False)
