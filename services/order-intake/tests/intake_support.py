"""Helpers of order-intake integration tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from fulfil.service import Runtime
from fulfil.testing import settings_for
from order_intake import service
from order_intake.config import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Intake:
    http: httpx.AsyncClient
    app: FastAPI
    key: str
    clock: FakeClock
    settings: Settings

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def new_key(self, name: str) -> str:
        async with self.runtime.sessions() as session:
            _, key = await service.create_client(session, name, self.clock())
        return key


def order_body(external_ref: str = "SO-1", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "external_ref": external_ref,
        "customer": {"id": "C-1", "tier": "core", "locale": "zh-CN", "email": "a@example.cn"},
        "lines": [
            {"line_no": 1, "sku": "TEA-OOLONG-250G", "qty": 5, "substitutes": ["TEA-OOLONG-500G"]},
            {"line_no": 2, "sku": "CUP-01", "qty": 3},
        ],
        "ship_to": {
            "name": "Li Wei",
            "line1": "88 Century Ave",
            "city": "Shanghai",
            "postal_code": "200120",
            "country": "CN",
        },
        "service_level": "express",
    }
    body.update(changes)
    return body


def intake_settings(kafka_bootstrap: str, url: str, topic: str, **overrides: Any) -> Settings:
    base = settings_for(kafka_bootstrap, url, topic=topic, service_name="order-intake")
    return Settings(**{**base.model_dump(), **overrides})
