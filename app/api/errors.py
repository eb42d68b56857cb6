"""One error shape for every API error: {"error": {"status", "code", "message", "details"?}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.errors import AtlasError, NotFound
from app.responses import JSON

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_parameters",
          429: "rate_limited", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details=None):
        self.status, self.code, self.message, self.details = status, code, message, details
        super().__init__(message)


def error_body(status: int, code: str, message: str, details=None) -> dict:
    body = {"status": status, "code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def install_error_handlers(app: FastAPI, html_error) -> None:
    """JSON errors under /api, HTML error pages elsewhere; never a stack trace."""

    def respond(request: Request, status: int, code: str, message: str, details=None) -> Response:
        if _is_api(request):
            return JSON(error_body(status, code, message, details), status_code=status)
        return html_error(request, status, message)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return respond(request, exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return respond(request, 404, "not_found", exc.one_line())

    @app.exception_handler(AtlasError)
    async def _atlas_error(request: Request, exc: AtlasError):
        return respond(request, 400, "bad_request", exc.one_line())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        details = [{"location": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
                   for e in exc.errors()]
        first = details[0] if details else {"location": "", "message": "invalid request"}
        return respond(request, 422, "invalid_parameters", f"{first['location']}: {first['message']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else _CODES.get(exc.status_code, "error")
        return respond(request, exc.status_code, _CODES.get(exc.status_code, "error"), message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request, 500, "internal_error", "internal error; the server log has the details")
