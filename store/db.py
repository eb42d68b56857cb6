"""Engines, sessions and schema management for the store (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import orjson
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from store.errors import AtlasError, SchemaOutOfDate
from store.paths import resource_dir
from store.settings import get_settings

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the web server read while a worker or a publish writes; the busy timeout makes
    # concurrent writers wait instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def raw_rows(session: Session, sql: str, params: tuple) -> list[tuple]:
    """Run `sql` (written with ? placeholders) on the session's DBAPI connection and fetch every row.

    The feature page's small indexed reads go this way: SQLAlchemy's statement execution (cache
    lookup, result processing) cost more than the queries themselves. JSON columns come back as
    text (SQLite) or parsed (psycopg): see json_value."""
    conn = session.connection()
    style = conn.dialect.paramstyle
    if style in ("format", "pyformat"):
        sql = sql.replace("?", "%s")
    elif style != "qmark":  # a driver of another style: through SQLAlchemy with named parameters
        parts = sql.split("?")
        named = "".join(f"{part}:p{i}" for i, part in enumerate(parts[:-1])) + parts[-1]
        return [tuple(r) for r in session.execute(text(named), {f"p{i}": v for i, v in enumerate(params)})]
    cur = conn.connection.driver_connection.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


def json_value(v):
    """A JSON column's value as raw_rows (or a cast to text) returns it: text parsed, else as is."""
    if v is None or isinstance(v, (dict, list)):
        return v
    return orjson.loads(v)


def make_engine(url: str | None = None) -> Engine:
    """Create an engine for `url` (default: the settings' store), creating the SQLite folder."""
    url = url or get_settings().sqlalchemy_url
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise AtlasError(f"invalid database URL {url!r}", "use sqlite:///PATH or postgresql://USER:PASS@HOST/DB") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # No pre-ping (it costs a round trip per request): a connection that died with a server
        # restart is invalidated on its first error (a 503 for that request) and replaced.
        return create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800,
                             connect_args={"connect_timeout": 10})
    raise AtlasError(f"unsupported database {parsed.get_backend_name()!r}", "use SQLite or PostgreSQL")


@lru_cache
def get_engine() -> Engine:
    return make_engine()


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def describe(engine: Engine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


# --- schema management (Alembic) ---------------------------------------------------------------

def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise AtlasError(
            f"cannot reach the database at {describe(engine)}: {str(exc.orig).strip().splitlines()[0]}",
            "check DATABASE_URL and that the server is running",
        ) from None


def upgrade(engine: Engine | None = None, revision: str = "head") -> str:
    """Apply migrations up to `revision`; returns the new revision."""
    from alembic import command

    engine = engine or get_engine()
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise AtlasError(
            f"cannot reach the database at {describe(engine)}: {str(exc.orig).strip().splitlines()[0]}",
            "check DATABASE_URL and that the server is running",
        ) from None
    return current_revision(engine)


def check_schema(engine: Engine | None = None) -> None:
    """Refuse to run against a database whose schema is not this code's head revision."""
    engine = engine or get_engine()
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is None:
        tables = inspect(engine).get_table_names() if _reachable(engine) else []
        what = "has no SAE Atlas schema" if not tables else "was not created by SAE Atlas migrations"
        raise SchemaOutOfDate(f"the database at {describe(engine)} {what}", "run `sae-atlas db upgrade`")
    raise SchemaOutOfDate(
        f"the database at {describe(engine)} is at schema revision {current}, this code needs {head}",
        "run `sae-atlas db upgrade`",
    )


def _reachable(engine: Engine) -> bool:
    try:
        with engine.connect():
            return True
    except SQLAlchemyError:
        return False
