"""FastAPI dependencies: database sessions and API-key checks.

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, and a
thread hop per dependency per request costs more than the work they do (creating a session does
no I/O; the key check only touches the database when a key is needed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.api.errors import ApiError
from app.models import APIKey
from app.security import presented_key, verify_key
from app.settings import Settings

_READ_METHODS = frozenset(("GET", "HEAD"))


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Reads (GET/HEAD) get one on an autocommit connection: published
    data is immutable, so they need no transaction, and on PostgreSQL that saves the BEGIN and
    ROLLBACK round trips of every page view. Writes get an ordinary transactional session."""
    factory = request.app.state.read_sessionmaker if request.method in _READ_METHODS else request.app.state.sessionmaker
    session = factory()
    try:
        yield session
    finally:
        session.close()


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def read_access(request: Request, session: Session = Depends(get_session)) -> None:
    """Reads are public unless public_reads is off; then they need a valid key (header or the
    pages' key cookie)."""
    if request.app.state.settings.public_reads:
        return
    _require(request, session, allow_cookie=True)


async def write_access(request: Request, session: Session = Depends(get_session)) -> APIKey:
    """Writes always need a key in a header (never a cookie: no cross-site request can write)."""
    return _require(request, session, allow_cookie=False)


def _require(request: Request, session: Session, allow_cookie: bool) -> APIKey:
    key = presented_key(request, allow_cookie=allow_cookie)
    if key is None:
        raise ApiError(401, "unauthorized", "this request needs an API key: send 'Authorization: Bearer <key>' "
                                            "(create one with `sae-atlas keys create NAME`)")
    row = verify_key(session, key)
    if row is None:
        raise ApiError(403, "forbidden", "the API key is not valid or has been revoked")
    return row
