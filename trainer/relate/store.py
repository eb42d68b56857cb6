"""Relations in the store: relate two published SAEs, write the result, and find the pairs to
relate automatically when an SAE is published.

Automatic pairs (same model): the same site with another width (a width pair), or the same kind of
site and width one layer up or down (a layer pair). A relation changes what the pages of both
SAEs show, so writing one gives both SAEs a new version (their ETags change with it)."""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, delete, insert, or_, select
from sqlalchemy.orm import Session

from app.db import check_schema, get_engine
from app.errors import AtlasError
from app.models import SAE, FeatureLink, SAERelation, SAEStatus
from app.settings import get_settings
from trainer.relate.data import DataSpec, pair_chunks
from trainer.relate.pipeline import RelateConfig, Relation, Side, order_pair, relate_saes

log = logging.getLogger(__name__)


def clean_json(value):
    """NaN and infinities become None (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _ready(session: Session, name: str) -> SAE:
    sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise AtlasError(f"no published SAE named {name!r}", "list them with `sae-atlas` at /api/v1/saes or publish it first")
    return sae


def side_of(sae: SAE) -> Side:
    """Load a published SAE's weights from the folder it was published from."""
    from trainer.formats import load_sae

    path = Path(sae.weights_path or "")
    if not sae.weights_path or not path.exists():
        raise AtlasError(f"the weights of {sae.name!r} are not at {sae.weights_path!r} on this machine",
                         "relate on the machine that published it, or publish it again from its folder")
    loaded = load_sae(path)
    if loaded.sae.cfg.d_in != sae.d_in or loaded.sae.cfg.d_sae != sae.d_sae:
        raise AtlasError(f"the weights in {path} ({loaded.sae.cfg.d_in} x {loaded.sae.cfg.d_sae}) are not those published "
                         f"as {sae.name!r} ({sae.d_in} x {sae.d_sae})", "publish the SAE again")
    return Side(sae.name, loaded.sae, sae.site, sae.lm.name, sae.architecture)


def check_pair(a: SAE, b: SAE) -> None:
    """The one-line refusals, before any weights are loaded."""
    if a.id == b.id:
        raise AtlasError(f"cannot relate {a.name!r} to itself", "name two different SAEs")
    if a.lm_id != b.lm_id:
        raise AtlasError(f"{a.name!r} reads {a.lm.name} but {b.name!r} reads {b.lm.name}: only SAEs of one model can be "
                         "related", "pick two SAEs of the same model")
    if a.d_in != b.d_in:
        raise AtlasError(f"{a.name!r} reads {a.d_in}-dimensional activations but {b.name!r} reads {b.d_in}",
                         "relate SAEs of sites of the same width")


def relate_published(name_a: str, name_b: str, cfg: RelateConfig | None = None, engine: Engine | None = None,
                     lm=None, progress: bool = True) -> Relation:
    """Relate two published SAEs on data and store the relation (replacing an older one)."""
    cfg = cfg or RelateConfig(tokens=get_settings().relate_tokens)
    cfg.validate()
    engine = engine or get_engine()
    check_schema(engine)
    with Session(engine) as session:
        ra, rb = _ready(session, name_a), _ready(session, name_b)
        check_pair(ra, rb)
        x, y = side_of(ra), side_of(rb)
        analysis = {ra.name: (ra.config or {}).get("analysis", {}), rb.name: (rb.config or {}).get("analysis", {})}
        model = ra.lm.name
    a, b, _ = order_pair(x, y)
    spec = DataSpec.from_analysis(model, analysis[a.name])
    source: list[str] = []
    rel = relate_saes(a, b, pair_chunks(spec, [a.site, b.site], cfg.tokens, lm, describe=source), cfg,
                      progress=progress)
    rel.summary["data"] = {"source": source[0] if source else "", "corpus": spec.corpus, "split": spec.split,
                           "ctx_len": spec.ctx_len, "seed": spec.seed}
    write_relation(engine, rel)
    return rel


def write_relation(engine: Engine, rel: Relation) -> int:
    """Store a relation and its links in one transaction; returns its id."""
    links = rel.links
    with Session(engine) as session, session.begin():
        a, b = _ready(session, rel.a.name), _ready(session, rel.b.name)
        session.execute(delete(SAERelation).where(or_((SAERelation.sae_a_id == a.id) & (SAERelation.sae_b_id == b.id),
                                                      (SAERelation.sae_a_id == b.id) & (SAERelation.sae_b_id == a.id))))
        row = SAERelation(sae_a_id=a.id, sae_b_id=b.id, kind=rel.kind, n_tokens=int(rel.summary.get("tokens", 0)),
                          summary=clean_json(rel.summary))
        session.add(row)
        session.flush()

        def opt(v):
            return None if v is None or not math.isfinite(float(v)) else float(v)

        rows = [{"relation_id": row.id, "a_index": int(i) if i >= 0 else None, "b_index": int(j) if j >= 0 else None,
                 "label": str(lab), "kind": str(kind) or None, "cos": opt(c), "rho": opt(r), "p_b_given_a": opt(pba),
                 "p_a_given_b": opt(pab), "stitch_gain": opt(g)}
                for i, j, lab, kind, c, r, pba, pab, g in zip(links["a"], links["b"], links["label"], links["kind"],
                                                             links["cos"], links["rho"], links["p_b_given_a"],
                                                             links["p_a_given_b"], links["stitch_gain"])]
        for s in range(0, len(rows), 20_000):
            session.execute(insert(FeatureLink), rows[s:s + 20_000])
        a.version, b.version = uuid.uuid4().hex, uuid.uuid4().hex  # their pages now show this relation
        return row.id


def partners(session: Session, sae: SAE) -> list[SAE]:
    """Published SAEs to relate `sae` with automatically: same model, and the same site at another
    width, or the same kind of site and width one layer away."""
    kind = sae.site.split(".")[0]
    out = []
    for other in session.scalars(select(SAE).where(SAE.lm_id == sae.lm_id, SAE.id != sae.id,
                                                   SAE.status == SAEStatus.ready.value).order_by(SAE.name)):
        if other.d_in != sae.d_in:
            continue
        width_pair = other.site == sae.site and other.d_sae != sae.d_sae
        layer_pair = (other.site.split(".")[0] == kind and other.d_sae == sae.d_sae and other.layer is not None
                      and sae.layer is not None and abs(other.layer - sae.layer) == 1)
        if width_pair or layer_pair:
            out.append(other)
    return out


def relate_new(names: list[str], engine: Engine | None = None, lm=None, cfg: RelateConfig | None = None,
               progress: bool = True) -> list[tuple[str, str, str | None]]:
    """Relate each of the just-published SAEs `names` with its partners. A failure is logged and
    reported, never raised: the SAEs are published either way. Returns (a, b, error or None)."""
    engine = engine or get_engine()
    pairs: list[tuple[str, str]] = []
    with Session(engine) as session:
        for name in names:
            sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
            if sae is None:
                continue
            for other in partners(session, sae):
                pair = tuple(sorted((sae.name, other.name)))
                if pair not in pairs:
                    pairs.append(pair)
    results = []
    for a, b in pairs:
        try:
            rel = relate_published(a, b, cfg, engine, lm, progress)
            log.info("related %s and %s (%s pair) on %d tokens", rel.a.name, rel.b.name, rel.kind, rel.summary["tokens"])
            results.append((a, b, None))
        except AtlasError as exc:
            log.warning("could not relate %s and %s: %s", a, b, exc.one_line())
            results.append((a, b, exc.one_line()))
    return results
