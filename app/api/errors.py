"""One error shape for every API error: {"error": {"status", "code", "message", "details"?}}.

Under /api the body is that JSON; elsewhere it is the HTML error page. Nothing a client sees ever
contains a stack trace: unexpected exceptions are logged and answered with a generic 500 (see also
app.main.SecurityHeaders, which catches anything that escapes the handlers here).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from store.errors import AtlasError, Conflict, NotFound
from app.responses import JSON
from app.api_error import ApiError, error_body

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          406: "not_acceptable", 409: "conflict", 411: "length_required", 413: "too_large", 414: "uri_too_long",
          415: "unsupported_media_type", 422: "invalid_parameters", 429: "rate_limited", 500: "internal_error",
          503: "unavailable"}


def is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def _clip(value, limit: int = 200) -> str:
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= limit else s[:limit] + "…"


def validation_details(exc: RequestValidationError) -> list[dict]:
    """Pydantic's errors without the submitted input echoed back in full (it can be huge)."""
    out = []
    for e in exc.errors()[:20]:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"location": ".".join(loc), "message": _clip(e.get("msg", "invalid value"))})
    return out


def install_error_handlers(app: FastAPI, html_error) -> None:
    """JSON errors under /api, HTML error pages elsewhere; never a stack trace."""

    def respond(request: Request, status: int, code: str, message: str, details=None,
                headers: dict | None = None) -> Response:
        if is_api(request.url.path):
            return JSON(error_body(status, code, message, details), status_code=status, headers=headers)
        response = html_error(request, status, message)
        if headers:
            response.headers.update(headers)
        return response

    app.state.respond_error = respond

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return respond(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return respond(request, 404, "not_found", exc.one_line())

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return respond(request, 409, "conflict", exc.one_line())

    @app.exception_handler(AtlasError)
    async def _atlas_error(request: Request, exc: AtlasError):
        return respond(request, 400, "bad_request", exc.one_line())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        details = validation_details(exc)
        first = details[0] if details else {"location": "", "message": "invalid request"}
        where = first["location"].removeprefix("query.").removeprefix("path.").removeprefix("body.")
        return respond(request, 422, "invalid_parameters", f"{where}: {first['message']}" if where else first["message"],
                       details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and message == "Not Found":
            message = f"nothing at {_clip(request.url.path, 120)}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed here"
        return respond(request, exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(request: Request, exc: Exception):
        log.error("database unavailable on %s %s: %s", request.method, request.url.path,
                  str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
        return respond(request, 503, "unavailable", "the database is unavailable; try again shortly",
                       headers={"Retry-After": "5"})

    @app.exception_handler(DataError)
    async def _bad_data(request: Request, exc: DataError):
        # the database refused a value that came from the request (e.g. a NUL byte in text)
        log.info("database refused a value on %s %s: %s", request.method, request.url.path,
                 str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200])
        return respond(request, 422, "invalid_parameters", "a parameter holds a value the database cannot store or compare")

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError):
        log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
        return respond(request, 500, "internal_error", "internal error; the server log has the details")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return respond(request, 500, "internal_error", "internal error; the server log has the details")
