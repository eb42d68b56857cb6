"""Who may read and write: API keys, browser sessions, and the stored contrastive searches they ran."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import (
    Base,
    UTCDateTime,
    utcnow,
)


class KeyScope(str, enum.Enum):
    read = "read"  # reads, when public_reads is off
    write = "write"  # reads and writes (jobs, runs, cancels)


class APIKey(Base):
    """A key for reads (scope read) or reads and writes (scope write); only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="first characters, to tell keys apart")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(10), default=KeyScope.write.value, server_default=KeyScope.write.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ContrastQuery(Base):
    """A stored contrastive search (two sets of texts and its ranked latents), for its permalink.

    The texts are kept (zlib-compressed JSON) so the query can be re-run after the SAEs change;
    the result is the answer as computed, with the SAE versions it was computed on."""

    __tablename__ = "contrast_queries"
    __table_args__ = (Index("ix_contrast_queries_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, doc="random hex: the permalink")
    lm_name: Mapped[str] = mapped_column(String(200))
    label_a: Mapped[str] = mapped_column(String(100))
    label_b: Mapped[str] = mapped_column(String(100))
    n_a: Mapped[int] = mapped_column(Integer)
    n_b: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON, default=dict, doc="direction, density filter, limit, SAEs")
    texts: Mapped[bytes] = mapped_column(LargeBinary, doc='zlib-compressed JSON {"a": [...], "b": [...]}')
    result: Mapped[dict] = mapped_column(JSON, doc="the ranked latents and the summary, as computed")
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebSession(Base):
    """A browser's sign-in: the cookie holds a random token, the store only its SHA-256. Signing
    out, revoking the key or the expiry ends it; the key itself never reaches the browser."""

    __tablename__ = "web_sessions"
    __table_args__ = (Index("ix_web_sessions_api_key_id", "api_key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    api_key: Mapped[APIKey] = relationship()
