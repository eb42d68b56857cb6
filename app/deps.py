"""FastAPI dependencies: database sessions and API-key checks.

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, and a
thread hop per dependency per request costs more than the work they do (creating a session does
no I/O). When a key or a session must be looked up in the database, that lookup runs in the
thread pool (run_in_threadpool), never on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api_error import ApiError
from store.models import APIKey
from app.security import can_write, presented_key, session_key, verify_key

_READ_METHODS = frozenset(("GET", "HEAD"))
KEY_HELP = "send 'Authorization: Bearer <key>' (create one with `sae-atlas keys create NAME`)"


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


def reader(request: Request, session: Session) -> APIKey:
    """The key of a read on a private atlas: a header key of any scope, or a sign-in session."""
    raw = presented_key(request)
    if raw is not None:
        row = verify_key(session, raw)
        if row is None:
            raise ApiError(403, "forbidden", "the API key is not valid or has been revoked")
        return row
    row = session_key(session, request)
    if row is None:
        raise ApiError(401, "unauthorized", f"this atlas is private: sign in at /login, or {KEY_HELP}")
    return row


def writer(request: Request, session: Session) -> APIKey:
    """The key of a write: always from a header (a cookie never authorises an API write), scope write."""
    raw = presented_key(request)
    if raw is None:
        raise ApiError(401, "unauthorized", f"this request needs an API key: {KEY_HELP}")
    row = verify_key(session, raw)
    if row is None:
        raise ApiError(403, "forbidden", "the API key is not valid or has been revoked")
    if not can_write(row):
        raise ApiError(403, "forbidden", f"the API key {row.name!r} can only read; writes need a key with scope write")
    return row


async def read_access(request: Request, session: Session = Depends(get_session)) -> None:
    """Reads are public unless public_reads is off; then they need a key or a sign-in session."""
    if request.app.state.settings.public_reads:
        return
    await run_in_threadpool(reader, request, session)


async def write_access(request: Request, session: Session = Depends(get_session)) -> APIKey:
    """The write key, as KeyFirstRoute checked it before the body was read (or checked here, for a
    route of another class)."""
    checked = getattr(request.state, "api_key", None)
    if checked is not None:
        return checked
    return await run_in_threadpool(writer, request, session)


def _needs_write_key(dependant) -> bool:
    return any(d.call is write_access or _needs_write_key(d) for d in dependant.dependencies)


class KeyFirstRoute(APIRoute):
    """An API route that, when it depends on write_access, checks the write key before the request
    body is read or parsed (FastAPI's route handler reads and validates the body before it solves
    dependencies): 401 without a key, 403 for an unknown, revoked or read-only one, and nothing of
    the body is looked at. Routes without write_access behave as plain APIRoutes."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if not _needs_write_key(self.dependant):
            return handler

        async def key_first(request: Request):
            factory = request.app.state.sessionmaker

            def check() -> APIKey:
                with factory() as session:
                    key = writer(request, session)
                    session.commit()  # the key's last-used time
                    session.expunge(key)
                    return key

            request.state.api_key = await run_in_threadpool(check)
            return await handler(request)

        return key_first
