"""What every endpoint shares: the error body, the documented error statuses, and the list page."""

from __future__ import annotations

from typing import Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

T = TypeVar("T")
MAX_PER_PAGE = 500


class Open(BaseModel):
    model_config = {"extra": "allow"}


# --- errors and pages -----------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    location: str
    message: str


class ErrorInfo(BaseModel):
    status: int
    code: str = Field(description="machine-readable: not_found, invalid_parameters, unauthorized, conflict, ...")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    """Every error: {"error": {"status", "code", "message", "details"?}}."""

    error: ErrorInfo


def errors(*statuses: int) -> dict:
    """`responses=` for a route: the error statuses it can answer, all in the one error shape."""
    text = {400: "Bad request", 401: "No API key or session", 403: "The key is not valid, revoked, or read-only",
            404: "Not found", 409: "Conflict with the current state", 413: "Request body too large",
            422: "Invalid parameters", 503: "The database is unavailable (Retry-After)"}
    return {s: {"model": ErrorBody, "description": text.get(s, "Error")} for s in statuses}


READ_ERRORS = errors(401, 403, 404, 422, 503)
WRITE_ERRORS = errors(401, 403, 404, 409, 413, 422, 503)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="items over all pages")
    page: int = Field(description="this page, 1-based")
    per_page: int
    pages: int = Field(description="number of pages")


class PageParams:
    """`page` (1-based) and `per_page` query parameters, as every list endpoint takes them."""

    def __init__(self, page: int = Query(1, ge=1, le=1_000_000, description="page number, 1-based"),
                 per_page: int = Query(50, ge=1, le=MAX_PER_PAGE, description=f"items per page (1-{MAX_PER_PAGE})")):
        self.page = page
        self.per_page = per_page

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def body(self, items: list, total: int, **extra) -> dict:
        return {**extra, "items": items, "total": total, "page": self.page, "per_page": self.per_page,
                "pages": (total + self.per_page - 1) // self.per_page}
