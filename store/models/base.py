"""The ORM's floor: the declarative base with its constraint naming convention, column types that
behave the same on SQLite and PostgreSQL, and the status enums the tables share."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    MetaData,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL, but INTEGER on SQLite so that the primary key stays the rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# A 64-bit count: BIGINT on PostgreSQL; SQLite's INTEGER already holds 64 bits.
BigInt64 = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SAEStatus(str, enum.Enum):
    publishing = "publishing"  # rows are being written; readers never see it
    ready = "ready"
    failed = "failed"


class ExampleKind(enum.IntEnum):
    top = 0  # the highest activations, one per document
    interval = 1  # random examples from equal-width intervals of [0, max]
    random = 2  # a uniform random sample of positive activations


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


LIVE_JOB_STATUSES = (JobStatus.queued.value, JobStatus.running.value)
