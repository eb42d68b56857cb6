"""The writes that publish an SAE: its LM and vocabulary, the SAE row, its features and examples.

The offline pipeline (trainer/publish.py) turns an analysis folder into rows and calls these inside
one transaction; the last write flips the SAE to `ready`, and every reader filters on that status.
Examples go in with PostgreSQL COPY (binary) or SQLite's executemany on the raw driver connection;
features with a batched INSERT ... RETURNING so that examples can point at their ids.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable

import numpy as np
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.orm import Session

from store.db import check_schema, get_engine
from store.errors import AtlasError
from store.models import LM, SAE, Feature, SAEStatus, utcnow

EXAMPLE_COLUMNS = ("feature_id", "kind", "rank", "interval", "activation", "peak", "doc_id", "doc_offset", "token_ids", "acts")
# The names an SAE may be published under (the run form checks a sweep's names against it at submission).
PUBLISHED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> None:
    if not PUBLISHED_NAME_RE.fullmatch(name or ""):
        raise AtlasError(f"invalid SAE name {name!r}",
                         "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _taken(name: str) -> AtlasError:
    return AtlasError(f"an SAE named {name!r} is already published", "pass --replace to replace it, or choose another --name")


def check_can_publish(name: str, replace: bool, engine: Engine | None = None) -> None:
    """Fail before a long analysis, not after it: bad name, old schema, or a name already taken."""
    check_name(name)
    engine = engine or get_engine()
    check_schema(engine)
    if not replace:
        with Session(engine) as session:
            if session.scalar(select(SAE.id).where(SAE.name == name)) is not None:
                raise _taken(name)


def clear_name(session: Session, name: str, replace: bool) -> None:
    """Make room for `name`: refuse if it is taken, or delete the old SAE (readers see it until commit)."""
    old = session.scalar(select(SAE).where(SAE.name == name))
    if old is None:
        return
    if not replace:
        raise _taken(name)
    session.execute(delete(SAE).where(SAE.id == old.id))
    session.flush()


def get_or_create_lm(session: Session, info: dict, vocab: list[str]) -> LM:
    """The LM row of `info` (an analysis summary's "lm"), created with its vocabulary on first publish."""
    lm = session.scalar(select(LM).where(LM.name == info["name"]))
    if lm is not None:
        if lm.vocab_size != info["vocab_size"] or lm.d_model != info["d_model"]:
            raise AtlasError(f"the store already has an LM named {info['name']!r} with another vocabulary or width",
                             "publish with a different --model name")
        return lm
    lm = LM(name=info["name"], source=info["source"], architecture=info["architecture"], n_layers=info["n_layers"],
            d_model=info["d_model"], vocab_size=info["vocab_size"], bos_token_id=info.get("bos_token_id"),
            vocab=zlib.compress(json.dumps(vocab, ensure_ascii=False).encode(), 6))
    session.add(lm)
    session.flush()
    return lm


def insert_features(session: Session, rows: list[dict]) -> np.ndarray:
    """Insert an SAE's feature rows; returns the new ids indexed by latent index."""
    result = session.execute(insert(Feature).returning(Feature.id, Feature.index, sort_by_parameter_order=True), rows)
    ids = np.zeros(len(rows), dtype=np.int64)
    for fid, idx in result:
        ids[idx] = fid
    return ids


def insert_examples(session: Session, engine: Engine, rows: Iterable[tuple]) -> int:
    """Bulk-insert example tuples in EXAMPLE_COLUMNS order; returns how many."""
    if engine.dialect.name == "postgresql":
        return _copy_examples_postgres(session, rows)
    return _insert_examples_sqlite(session, rows)


def _copy_examples_postgres(session: Session, rows) -> int:
    raw = session.connection().connection.driver_connection
    n = 0
    with raw.cursor() as cur:
        with cur.copy(f"COPY examples ({', '.join(EXAMPLE_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int2", "int2", "int2", "float8", "int2", "int4", "int4", "bytea", "bytea"])
            for row in rows:
                copy.write_row(row)
                n += 1
    return n


def _insert_examples_sqlite(session: Session, rows, batch: int = 50_000) -> int:
    raw = session.connection().connection.driver_connection
    sql = f"INSERT INTO examples ({', '.join(EXAMPLE_COLUMNS)}) VALUES ({', '.join('?' * len(EXAMPLE_COLUMNS))})"
    cur = raw.cursor()
    n = 0
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= batch:
            cur.executemany(sql, chunk)
            n += len(chunk)
            chunk = []
    if chunk:
        cur.executemany(sql, chunk)
        n += len(chunk)
    return n


def mark_ready(session: Session, sae: SAE) -> None:
    """The publish's last write: from here on readers see the SAE."""
    sae.status = SAEStatus.ready.value
    sae.published_at = utcnow()
    session.flush()


def analyze_after_bulk_load(engine: Engine) -> None:
    """Fresh planner statistics after a bulk load (PostgreSQL only)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE features")
            conn.exec_driver_sql("ANALYZE examples")
            conn.commit()


def clean_json(value):
    """A value JSON (and PostgreSQL's jsonb) accepts: NaN and infinities become None, numpy scalars
    and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def insert_structure(session: Session, sae_id: int, partners: list[list], xy: np.ndarray | None = None,
                     cluster: np.ndarray | None = None) -> None:
    """One latent_structure row per latent: its co-firing partners and, with a map, its place on it."""
    from store.models import LatentStructure

    rows = [{"sae_id": sae_id, "latent_index": i, "partners": p,
             "x": float(xy[i, 0]) if xy is not None else None, "y": float(xy[i, 1]) if xy is not None else None,
             "cluster": int(cluster[i]) if cluster is not None else None} for i, p in enumerate(partners)]
    if rows:
        session.execute(insert(LatentStructure), rows)


def insert_map(session: Session, sae_id: int, config: dict, clusters: list[dict]) -> None:
    from store.models import SAEMap

    session.add(SAEMap(sae_id=sae_id, config=clean_json(config), clusters=clean_json(clusters)))


def insert_groups(session: Session, sae_id: int, groups: list[dict]) -> None:
    """Feature groups in the order given (most irreducible first): rank 0, 1, ..."""
    from store.models import FeatureGroup

    rows = [{"sae_id": sae_id, "rank": r, "latents": g["latents"], "n_tokens": g["n_tokens"],
             "separability": g["separability"], "mixture": g["mixture"], "circle_residual": g["circle_residual"],
             "variance_share": clean_json(g["variance_share"]), "scatter": clean_json(g["scatter"])}
            for r, g in enumerate(groups)]
    if rows:
        session.execute(insert(FeatureGroup), rows)


def replace_map(session: Session, sae: SAE, xy: np.ndarray, cluster: np.ndarray, config: dict, clusters: list[dict]) -> None:
    """Put a new map in place of an SAE's old one (`sae-atlas map`): every latent's place, the
    clusters, and a new SAE version so that cached pages and ETags move on."""
    from sqlalchemy import bindparam, update

    from store.models import LatentStructure, SAEMap

    t = LatentStructure.__table__
    have = set(session.scalars(select(LatentStructure.latent_index).where(LatentStructure.sae_id == sae.id)))
    missing = [i for i in range(len(xy)) if i not in have]
    if missing:  # published before co-firing partners existed: rows without partners
        session.execute(insert(LatentStructure), [{"sae_id": sae.id, "latent_index": i, "partners": []} for i in missing])
    session.connection().execute(
        update(t).where(t.c.sae_id == sae.id, t.c.latent_index == bindparam("b_i"))
        .values(x=bindparam("b_x"), y=bindparam("b_y"), cluster=bindparam("b_c")),
        [{"b_i": i, "b_x": float(xy[i, 0]), "b_y": float(xy[i, 1]), "b_c": int(cluster[i])} for i in range(len(xy))])
    session.execute(delete(SAEMap).where(SAEMap.sae_id == sae.id))
    insert_map(session, sae.id, config, clusters)
    import uuid

    sae.version = uuid.uuid4().hex
