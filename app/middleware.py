"""ASGI middleware that acts before a request body is read: the size limit and the write-key gate.

Both are pure ASGI (no BaseHTTPMiddleware), and answer in the one error shape through the app's
respond_error (JSON under /api, the HTML error page elsewhere).
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match

from app.api.errors import ApiError, is_api

_BODYLESS = frozenset(("GET", "HEAD", "OPTIONS"))


async def _answer(scope, receive, send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    request = Request(scope)
    respond = scope["app"].state.respond_error
    await respond(request, status, code, message, headers=headers)(scope, receive, send)


class BodyLimit:
    """413 for a body over max_bytes: at once when Content-Length says so (nothing is read), and
    while reading when a body without a length (chunked) grows past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes:,} bytes (SAE_ATLAS_MAX_BODY_BYTES)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _answer(scope, receive, send, 400, "bad_request", "Content-Length is not a number")
                if length > self.max_bytes:
                    return await _answer(scope, receive, send, 413, "too_large", self._too_large())
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException: FastAPI's body reading lets it through to the app's handler.
                    raise HTTPException(413, self._too_large())
            return message

        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watch)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await _answer(scope, receive, send, 413, "too_large", self._too_large())


class WriteKeyGate:
    """Writes to the JSON API need a write-scope key, checked before the body is read or parsed:
    401 without a key, 403 for an unknown, revoked or read-only one. The checked key is left in
    request.state.api_key for app.deps.write_access."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _BODYLESS or not is_api(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if not any(route.matches(scope)[0] == Match.FULL for route in scope["app"].router.routes):
            return await self.app(scope, receive, send)  # no such write: the router answers 404 or 405
        from app.deps import writer

        request = Request(scope)
        session = scope["app"].state.sessionmaker()
        try:
            key = await run_in_threadpool(writer, request, session)
            session.expunge(key)
        except ApiError as exc:
            return await _answer(scope, receive, send, exc.status, exc.code, exc.message, exc.headers)
        except (OperationalError, PoolTimeout):
            return await _answer(scope, receive, send, 503, "unavailable", "the database is unavailable; try again shortly",
                                 {"Retry-After": "5"})
        finally:
            session.close()
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)
