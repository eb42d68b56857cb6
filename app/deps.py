"""FastAPI dependencies: database sessions and API-key checks."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.api.errors import ApiError
from app.models import APIKey
from app.security import presented_key, verify_key
from app.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def read_access(request: Request, session: Session = Depends(get_session)) -> None:
    """Reads are public unless public_reads is off; then they need a valid key."""
    if request.app.state.settings.public_reads:
        return
    _require(request, session)


def write_access(request: Request, session: Session = Depends(get_session)) -> APIKey:
    return _require(request, session)


def _require(request: Request, session: Session) -> APIKey:
    key = presented_key(request)
    if key is None:
        raise ApiError(401, "unauthorized", "this request needs an API key: send 'Authorization: Bearer <key>' "
                                            "(create one with `sae-atlas keys create NAME`)")
    row = verify_key(session, key)
    if row is None:
        raise ApiError(403, "forbidden", "the API key is not valid or has been revoked")
    return row
