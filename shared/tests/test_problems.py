"""RFC 9457 at the HTTP edge: the right 4xx with problem+json, never a 5xx for bad input."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fulfil.problems import Conflict, RequestGuard, install_problem_handlers, json_pointer
from pydantic import BaseModel, Field


class Line(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class Body(BaseModel):
    lines: list[Line]


@pytest.fixture
def client() -> httpx.AsyncClient:
    app = FastAPI()
    install_problem_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=1000)

    @app.post("/v1/things")
    async def create(body: Body) -> dict[str, int]:
        return {"lines": len(body.lines)}

    @app.post("/v1/conflict")
    async def conflict() -> None:
        raise Conflict("order o-1 has shipped", order_id="o-1")

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


async def test_validation_errors_list_every_bad_field_with_a_json_pointer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/things", json={"lines": [{"sku": "A", "qty": 0}, {"qty": 1}]})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    pointers = {error["pointer"] for error in response.json()["errors"]}
    assert pointers == {"/lines/0/qty", "/lines/1/sku"}


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/things", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["title"] == "Malformed JSON"


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/things", content=b"lines=1", headers={"content-type": "text/plain"})
    assert response.status_code == 415


async def test_oversized_bodies_are_413_by_header_and_by_stream(client: httpx.AsyncClient) -> None:
    big = b'{"lines": [' + b'{"sku": "A", "qty": 1},' * 100 + b'{"sku": "A", "qty": 1}]}'
    assert (
        await client.post("/v1/things", content=big, headers={"content-type": "application/json"})
    ).status_code == 413

    async def chunks():  # type: ignore[no-untyped-def]
        yield big  # no content-length: streamed

    response = await client.post("/v1/things", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


async def test_problems_carry_their_extensions(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/conflict")
    assert response.status_code == 409
    assert response.json() == {
        "type": "https://fulfil.dev/problems/conflict",
        "title": "Conflict",
        "status": 409,
        "detail": "order o-1 has shipped",
        "instance": "/v1/conflict",
        "order_id": "o-1",
    }


async def test_unknown_routes_are_problem_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_unexpected_errors_do_not_leak_internals(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/boom")
    assert response.status_code == 500
    assert "bug" not in response.text


def test_json_pointer_escapes_per_rfc_6901() -> None:
    assert json_pointer(("body", "a/b", "c~d", 0)) == "/a~1b/c~0d/0"
