"""The ops dashboard in a real headless Chromium (Debian's chromium package), driven over
the DevTools protocol: the kpi app runs under uvicorn on a free loopback port with the
real broker; events are posted; the page must show the live numbers of GET /v1/kpis,
for the default window (all time) and after switching to 24h, and fit a laptop screen.

Set KPI_DASHBOARD_SCREENSHOT=/some/file.png to keep the 1366x768 screenshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fulfil.broker import die_with_parent, free_port
from fulfil.testing import create_topics, eventually, settings_for
from kpi.config import Settings
from kpi.main import create_app
from kpi_scenario import NOW
from test_kpi_service import publish, shuffled_with_duplicates
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREEN = {"width": 1366, "height": 768}

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"headless browser test needs {CHROMIUM} (Debian package chromium: apt-get install -y chromium)",
)

READ_PAGE = """JSON.stringify((() => {
  const rows = (id) => [...document.querySelectorAll("#" + id + " tr[data-key]")].map(
    (tr) => [tr.dataset.key, ...[...tr.children].slice(1).map((td) => td.textContent)]);
  return {
    version: document.getElementById("status").dataset.version || null,
    window: document.body.dataset.window || null,
    tiles: [...document.querySelectorAll(".tile[data-kpi]")].map((t) => ({
      kpi: t.dataset.kpi, numerator: Number(t.dataset.numerator), denominator: Number(t.dataset.denominator),
      value: t.querySelector(".value").textContent})),
    counts: Object.fromEntries([...document.querySelectorAll("[data-count]")].map(
      (e) => [e.dataset.count, Number(e.textContent)])),
    kpis: rows("kpis"), backlog: rows("backlog"), warehouses: rows("warehouses"), carriers: rows("carriers"),
    stages: rows("stages"), stockouts: rows("stockouts"),
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  };
})())"""


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.last_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path) -> AsyncIterator[DevTools]:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    command += [f"--window-size={SCREEN['width']},{SCREEN['height']}", url]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        active_port = profile / "DevToolsActivePort"
        await eventually(active_port.exists, timeout=30)
        port = int((await asyncio.to_thread(active_port.read_text)).split()[0])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def page_target() -> str | None:
                targets = (await client.get("/json/list")).json()
                return next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)

            target = await eventually(page_target, timeout=30)
        async with connect(target, max_size=None) as socket:
            yield DevTools(socket)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def pct(value: float | None) -> str:
    """The page's percentage format: (100 * v).toFixed(1) + "%"."""
    return "–" if value is None else f"{100 * value:.1f}%"


def check_page_against_api(page: dict[str, Any], report: dict[str, Any], window: str) -> None:
    overall = report["overall"]
    kpis = {k["kpi"]: k for k in overall["kpis"]}
    assert page["window"] == window
    for tile in page["tiles"]:
        expected = kpis[tile["kpi"]]
        assert (tile["numerator"], tile["denominator"]) == (expected["numerator"], expected["denominator"]), tile
        assert tile["value"] == pct(expected["value"]), tile
    assert {t["kpi"] for t in page["tiles"]} >= {"perfect_order_rate", "otif_rate", "on_time_dispatch_rate"}
    assert page["counts"] == {
        k: overall[k] for k in ("orders_received", "orders_delivered", "orders_open", "orders_cancelled")
    }
    assert [(row[0], int(row[1]), int(row[2]), row[3]) for row in page["kpis"]] == [
        (k["kpi"], k["numerator"], k["denominator"], pct(k["value"])) for k in overall["kpis"]
    ]
    backlog = {row[0]: int(row[1]) for row in page["backlog"]}
    assert backlog == {**overall["open_by_stage"], "total": overall["orders_open"]}
    stockouts = [(row[0], int(row[1]), int(row[2])) for row in page["stockouts"]]
    assert stockouts == [(s["sku"], s["backordered_lines"], s["ordered_lines"]) for s in overall["top_stockout_skus"]]


def check_groups(rows: list[list[str]], report: dict[str, Any]) -> None:
    expected = []
    for group in report["groups"]:
        rates = {k["kpi"]: k["value"] for k in group["kpis"]}
        expected.append(
            [
                group["group"],
                str(group["orders_received"]),
                pct(rates["perfect_order_rate"]),
                pct(rates["otif_rate"]),
                pct(rates["on_time_dispatch_rate"]),
            ]
        )
    assert rows == expected


async def test_the_dashboard_shows_the_live_kpis_of_the_api(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, tmp_path: Path
) -> None:
    settings = Settings(**settings_for(kafka_bootstrap, sqlite_url, topic=topic_name, service_name="kpi").model_dump())
    await create_topics(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, clock=lambda: NOW), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, timeout=30)
        base = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as client,
            chromium(f"{base}/", tmp_path / "profile") as page,
        ):
            await eventually(lambda: page.evaluate("document.readyState === 'complete'"), timeout=30)
            await publish(settings, shuffled_with_duplicates(13))

            async def everything_shown() -> dict[str, Any] | None:
                shown: dict[str, Any] = json.loads(await page.evaluate(READ_PAGE))
                done = shown["version"] is not None and shown["counts"].get("orders_delivered") == 8
                return shown if done and shown["counts"].get("orders_open") == 4 else None

            shown = await eventually(everything_shown, timeout=60, interval=0.25)
            report = (await client.get("/v1/kpis")).json()
            check_page_against_api(shown, report, "all")
            assert report["overall"]["orders_delivered"] == 8  # the page showed the finished scenario
            check_groups(shown["warehouses"], (await client.get("/v1/kpis", params={"by": "warehouse"})).json())
            check_groups(shown["carriers"], (await client.get("/v1/kpis", params={"by": "carrier"})).json())
            cycle = {s["series"]: s for s in (await client.get("/v1/kpis/cycle-time")).json()["overall"]}
            assert {row[0]: int(row[1]) for row in shown["stages"]} == {k: v["count"] for k, v in cycle.items()}
            assert shown["overflow"] <= 0, "the page is wider than a 1366 px laptop screen"

            await page.call("Emulation.setDeviceMetricsOverride", **SCREEN, deviceScaleFactor=1, mobile=False)
            screenshot = base64.b64decode((await page.call("Page.captureScreenshot", format="png"))["data"])
            assert screenshot.startswith(b"\x89PNG")
            if target := os.environ.get("KPI_DASHBOARD_SCREENSHOT"):
                await asyncio.to_thread(Path(target).write_bytes, screenshot)

            await page.evaluate("document.querySelector('#windows button[value=\"24h\"]').click()")

            async def day_shown() -> dict[str, Any] | None:
                shown: dict[str, Any] = json.loads(await page.evaluate(READ_PAGE))
                return shown if shown["window"] == "24h" else None

            day = await eventually(day_shown, timeout=30, interval=0.25)
            check_page_against_api(day, (await client.get("/v1/kpis", params={"window": "24h"})).json(), "24h")
            assert day["counts"]["orders_received"] == 1  # only O13
            assert await page.evaluate("location.search") == "?window=24h"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)
