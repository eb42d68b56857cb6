"""Relate two published SAEs and store the result (store/relations.py writes it), and relate a
just-published SAE with its partners automatically.

Automatic pairs (same model): the same site with another width (a width pair), or the same kind of
site and width one layer up or down (a layer pair). A relation changes what the pages of both
SAEs show, so writing one gives both SAEs a new version (their ETags change with it)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from store import relations
from store.db import check_schema, get_engine
from store.errors import AtlasError
from store.models import SAE, SAEStatus
from store.settings import get_settings
from trainer.relate.data import DataSpec, pair_chunks
from trainer.relate.pipeline import RelateConfig, Relation, Side, order_pair, relate_saes

log = logging.getLogger(__name__)


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
        ra, rb = relations.ready_sae(session, name_a), relations.ready_sae(session, name_b)
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
    """Store a relation and its links (replacing an older one of the pair); returns its id."""
    return relations.write_relation(engine, rel.a.name, rel.b.name, rel.kind, rel.summary, rel.links)


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
            for other in relations.partners(session, sae):
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
