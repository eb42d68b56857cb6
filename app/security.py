"""API keys with scopes, sign-in sessions, CSRF tokens, and who is talking to us over TLS.

- Keys: only their SHA-256 is stored. Scope `read` reads a private atlas; scope `write` also queues
  jobs and runs and cancels them. Keys travel in `Authorization: Bearer` (or `X-API-Key`) headers.
- Sessions: signing in on /login turns a key into a server-side session. The browser gets a random
  token (HttpOnly, SameSite=Lax, Secure over TLS), the store its SHA-256; the key itself never
  reaches a cookie. Signing out deletes the session; revoking the key ends its sessions too.
- CSRF: every form that acts with the browser's cookies carries a token. With a session it is an
  HMAC of the session token (bound to it, useless to anyone without the HttpOnly cookie); before
  signing in it is a random value also set as an HttpOnly, SameSite=Strict cookie (double submit).
- TLS behind a proxy: X-Forwarded-Proto is believed only from the addresses in
  SAE_ATLAS_TRUSTED_PROXIES, so a client cannot talk its way into (or out of) Secure cookies.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from datetime import timedelta

from fastapi import Request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.errors import AtlasError, NotFound
from store.models import APIKey, KeyScope, WebSession, utcnow

KEY_PREFIX = "atlas_"
SESSION_COOKIE = "atlas_session"
CSRF_COOKIE = "atlas_csrf"
CSRF_FIELD = "csrf_token"
SCOPES = tuple(s.value for s in KeyScope)


def hash_key(key: str) -> str:
    # Keys and session tokens are 256-bit random strings, so a plain SHA-256 cannot be brute-forced.
    return hashlib.sha256(key.encode()).hexdigest()


# --- keys ----------------------------------------------------------------------------------------

def create_key(session: Session, name: str, scope: str = KeyScope.write.value) -> str:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise AtlasError("an API key needs a name of 1-200 characters")
    if scope not in SCOPES:
        raise AtlasError(f"unknown scope {scope!r}", "use read (reads of a private atlas) or write (also jobs and runs)")
    if session.scalar(select(APIKey).where(APIKey.name == name)):
        raise AtlasError(f"an API key named {name!r} exists", "revoke it first or choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(APIKey(name=name, prefix=key[:12], key_hash=hash_key(key), scope=scope))
    session.flush()
    return key


def revoke_key(session: Session, name: str) -> None:
    key = session.scalar(select(APIKey).where(APIKey.name == name, APIKey.revoked_at.is_(None)))
    if key is None:
        raise NotFound(f"no active API key named {name!r}", "see `sae-atlas keys list`")
    key.revoked_at = utcnow()
    session.execute(delete(WebSession).where(WebSession.api_key_id == key.id))


def list_keys(session: Session) -> list[APIKey]:
    return list(session.scalars(select(APIKey).order_by(APIKey.created_at)))


def can_write(key: APIKey | None) -> bool:
    return key is not None and key.scope == KeyScope.write.value


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer …` or `X-API-Key` (never from a cookie)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def _touch(session: Session, row) -> None:
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=5):
        row.last_used_at = now  # coarse, so reads do not turn into writes
        session.commit()


def verify_key(session: Session, key: str | None) -> APIKey | None:
    if not key or len(key) > 200 or not key.isascii():
        return None
    digest = hash_key(key)
    row = session.scalar(select(APIKey).where(APIKey.key_hash == digest, APIKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    _touch(session, row)
    return row


# --- sessions ------------------------------------------------------------------------------------

def start_session(session: Session, key: APIKey, ttl_s: float) -> str:
    """A new sign-in for `key`; returns the token for the cookie (the store keeps its hash)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at < now))  # sweep old ones as we go
    session.add(WebSession(token_hash=hash_key(token), api_key_id=key.id, created_at=now,
                           expires_at=now + timedelta(seconds=ttl_s)))
    session.flush()
    return token


def session_token(request: Request) -> str | None:
    token = request.cookies.get(SESSION_COOKIE)
    return token if token and len(token) <= 100 and token.isascii() else None


def session_key(session: Session, request: Request) -> APIKey | None:
    """The key behind the request's sign-in cookie, if the session is live and its key not revoked."""
    token = session_token(request)
    if token is None:
        return None
    row = session.execute(
        select(APIKey).join(WebSession, WebSession.api_key_id == APIKey.id)
        .where(WebSession.token_hash == hash_key(token), WebSession.expires_at > utcnow(),
               APIKey.revoked_at.is_(None))).scalar_one_or_none()
    if row is not None:
        _touch(session, row)
    return row


def end_session(session: Session, request: Request) -> None:
    token = session_token(request)
    if token is not None:
        session.execute(delete(WebSession).where(WebSession.token_hash == hash_key(token)))


# --- CSRF ----------------------------------------------------------------------------------------

def _session_csrf(token: str) -> str:
    return hmac.new(token.encode(), b"sae-atlas csrf", hashlib.sha256).hexdigest()


def csrf_token(request: Request) -> str:
    """The token this request's forms must carry. Without a session and without a CSRF cookie a
    new random one is made; set_csrf_cookie then sends it with the response."""
    token = session_token(request)
    if token is not None:
        return _session_csrf(token)
    cookie = request.cookies.get(CSRF_COOKIE)
    if cookie and 20 <= len(cookie) <= 100 and cookie.isascii():
        return cookie
    fresh = getattr(request.state, "new_csrf", None)
    if fresh is None:
        fresh = request.state.new_csrf = secrets.token_urlsafe(32)
    return fresh


def csrf_valid(request: Request, submitted: str | None) -> bool:
    """Whether a submitted form's token matches this browser's (session-bound or double-submit)."""
    if not submitted or len(submitted) > 200:
        return False
    token = session_token(request)
    if token is not None:
        expected = _session_csrf(token)
    else:
        expected = request.cookies.get(CSRF_COOKIE) or ""
    return bool(expected) and hmac.compare_digest(expected.encode(), submitted.encode())


def set_csrf_cookie(request: Request, response) -> None:
    fresh = getattr(request.state, "new_csrf", None)
    if fresh is not None:
        response.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict", secure=is_https(request), path="/")


# --- TLS behind trusted proxies --------------------------------------------------------------------

def _trusted(host: str | None, proxies: list[str]) -> bool:
    if not host or not proxies:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(p, strict=False) for p in proxies)


def is_https(request: Request) -> bool:
    """True when the browser talks TLS: to us directly, or to a proxy in trusted_proxies that said
    so in X-Forwarded-Proto. The header of anyone else is ignored."""
    if request.url.scheme == "https":
        return True
    settings = request.app.state.settings
    client = request.client.host if request.client else None
    if not _trusted(client, settings.trusted_proxies):
        return False
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https"
