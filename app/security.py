"""API keys (only their SHA-256 is stored) and the dependencies that guard reads and writes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import AtlasError, NotFound
from app.models import APIKey, utcnow

KEY_PREFIX = "atlas_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 cannot be brute-forced; no salt needed.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise AtlasError("an API key needs a name of 1-200 characters")
    if session.scalar(select(APIKey).where(APIKey.name == name)):
        raise AtlasError(f"an API key named {name!r} exists", "revoke it first or choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(APIKey(name=name, prefix=key[:12], key_hash=hash_key(key)))
    session.flush()
    return key


def revoke_key(session: Session, name: str) -> None:
    key = session.scalar(select(APIKey).where(APIKey.name == name, APIKey.revoked_at.is_(None)))
    if key is None:
        raise NotFound(f"no active API key named {name!r}", "see `sae-atlas keys list`")
    key.revoked_at = utcnow()


def list_keys(session: Session) -> list[APIKey]:
    return list(session.scalars(select(APIKey).order_by(APIKey.created_at)))


KEY_COOKIE = "atlas_key"


def presented_key(request: Request, allow_cookie: bool = False) -> str | None:
    """The key from `Authorization: Bearer …` or `X-API-Key`; with allow_cookie, also the key
    cookie that the sign-in page sets for browsing when reads are private."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    if allow_cookie:
        return request.cookies.get(KEY_COOKIE) or None
    return None


def verify_key(session: Session, key: str | None) -> APIKey | None:
    if not key or len(key) > 200 or not key.isascii():
        return None
    digest = hash_key(key)
    row = session.scalar(select(APIKey).where(APIKey.key_hash == digest, APIKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=5):
        row.last_used_at = now  # coarse, so reads do not turn into writes
        session.commit()
    return row
