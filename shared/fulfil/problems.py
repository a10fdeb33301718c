"""RFC 9457 problem details: every refusal says what was wrong, with the right 4xx.

Services raise ``Problem`` (or a subclass) from their use cases; the handlers here map
it, validation errors and unexpected errors to ``application/problem+json`` once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://fulfil.dev/problems/"
MAX_BODY_BYTES = 1_048_576


class Problem(Exception):
    """An error the client can act on."""

    status: int = 400
    type: str = "about:blank"
    title: str = "Bad Request"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        if type is not None:
            self.type = type
        self.headers = headers or {}
        self.extensions = extensions


class NotFound(Problem):
    status = 404
    title = "Not Found"
    type = PROBLEM_BASE + "not-found"


class Conflict(Problem):
    status = 409
    title = "Conflict"
    type = PROBLEM_BASE + "conflict"


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str = "about:blank",
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update(jsonable_encoder(extensions))
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def json_pointer(location: Sequence[int | str]) -> str:
    """RFC 6901 pointer into the request body for a Pydantic error location."""
    parts = list(location)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return "/" + "/".join(str(part).replace("~", "~0").replace("/", "~1") for part in parts) if parts else ""


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "pointer": json_pointer(error.get("loc", ())),
            "location": error.get("loc", ("body",))[0] if error.get("loc") else "body",
            "detail": error.get("msg", "invalid"),
            "code": error.get("type", "invalid"),
        }
        for error in errors
    ]


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.title,
            exc.detail,
            type=exc.type,
            instance=request.url.path,
            headers=exc.headers,
            **exc.extensions,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return problem_response(
                400,
                "Malformed JSON",
                "the request body is not valid JSON",
                type=PROBLEM_BASE + "malformed-json",
                instance=request.url.path,
            )
        return problem_response(
            422,
            "Validation failed",
            f"{len(errors)} invalid field(s)",
            type=PROBLEM_BASE + "validation",
            instance=request.url.path,
            errors=validation_errors(errors),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            exc.status_code,
            _reason(exc.status_code),
            exc.detail if isinstance(exc.detail, str) else None,
            instance=request.url.path,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal Server Error", "an unexpected error occurred; it has been logged")


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class RequestGuard:
    """ASGI middleware at the HTTP edge: bodies over the limit get 413, bodies that are
    not JSON get 415, both as problem+json, before any route sees them."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES, json_prefixes: Sequence[str] = ("/v1/",)
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_prefixes = tuple(json_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._refuse(
                scope,
                receive,
                send,
                413,
                "Content Too Large",
                f"request bodies are limited to {self.max_body_bytes} bytes",
            )
            return
        path: str = scope["path"]
        # A body without Content-Length (chunked) is checked once it has arrived, below.
        if length not in (None, "0") and not self._acceptable_type(path, headers):
            await self._refuse(scope, receive, send, 415, "Unsupported Media Type", "send the body as application/json")
            return
        if length is not None:
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): buffer up to the limit, so the route never sees a cut body.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    413,
                    "Content Too Large",
                    f"request bodies are limited to {self.max_body_bytes} bytes",
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and not self._acceptable_type(path, headers):
            await self._refuse(scope, receive, send, 415, "Unsupported Media Type", "send the body as application/json")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _acceptable_type(self, path: str, headers: dict[str, str]) -> bool:
        """A body sent to the JSON API is JSON (application/json or a +json type)."""
        if not path.startswith(self.json_prefixes):
            return True
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        return media_type == "application/json" or media_type.endswith("+json")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str) -> None:
        response = problem_response(status, title, detail, instance=scope["path"])
        await response(scope, receive, send)


ProblemHandler = Callable[[Request, Exception], Awaitable[JSONResponse]]
