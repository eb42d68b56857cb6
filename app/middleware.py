"""ASGI middleware that acts before a request body is read: the size limit. (The write-key check
that also precedes the body is app.deps.KeyFirstRoute.)

Pure ASGI (no BaseHTTPMiddleware), and answer in the one error shape through the app's
respond_error (JSON under /api, the HTML error page elsewhere).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request


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
