"""Publish an analysed SAE into the store in bulk, in one transaction.

Readers never see a half-written SAE: everything (the LM and its vocabulary, the SAE row, every
feature, every example) is written in a single transaction whose last statement flips the SAE's
status to `ready`, and every reader filters on that status. If the connection drops midway the
transaction rolls back and the store is as it was. Publishing an existing name is refused unless
`replace=True`, in which case the old SAE is deleted inside the same transaction (readers keep
seeing it until the commit).

This module turns an analysis folder into rows; the writes themselves are the store's
(store/publish.py). What the SAE misses (the analysis's darkmatter.json) goes in with it.

After the commit, each new SAE is related to the published SAEs of the same model that share its
site (a width pair) or sit one layer away (a layer pair), see trainer/relate/published.py. Relations
are written in their own transactions: a failed relation is reported, and the SAE stays published.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from store import publish as writes
from store.db import check_schema, describe, get_engine
from store.errors import AtlasError
from store.models import SAE, ExampleKind, SAEDarkMatter, SAEStatus
from store.settings import get_settings
from trainer.analyze import ANALYSIS_DIR
from trainer.relate.cofiring import Partners

log = logging.getLogger(__name__)



@dataclass
class Analysis:
    """The files `sae-atlas analyze` writes, loaded."""

    folder: Path
    summary: dict
    features: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]
    vocab: list[str]
    dark_matter: dict | None = None
    partners: Partners | None = None
    """Co-firing partners (cofiring.npz; absent in analyses made before it existed)."""
    groups: dict | None = None
    """Feature groups (groups.json), when the analysis looked for them."""

    @classmethod
    def load(cls, sae_dir: Path) -> Analysis:
        folder = Path(sae_dir) / ANALYSIS_DIR if (Path(sae_dir) / ANALYSIS_DIR).is_dir() else Path(sae_dir)
        if not (folder / "DONE").is_file():
            raise AtlasError(f"{sae_dir} has no finished analysis", f"run `sae-atlas analyze {sae_dir}` first")
        try:
            with np.load(folder / "features.npz") as f, np.load(folder / "examples.npz") as e:
                features = {k: f[k] for k in f.files}
                examples = {k: e[k] for k in e.files}
            summary = json.loads((folder / "summary.json").read_text())
            vocab = json.loads((folder / "vocab.json").read_text())
            dark = json.loads((folder / "darkmatter.json").read_text()) if (folder / "darkmatter.json").is_file() else None
            partners = None
            if (folder / "cofiring.npz").is_file():
                with np.load(folder / "cofiring.npz") as z:
                    partners = Partners.from_arrays(z)
            groups = json.loads((folder / "groups.json").read_text()) if (folder / "groups.json").is_file() else None
        except (OSError, ValueError, KeyError) as exc:
            raise AtlasError(f"the analysis in {folder} is damaged ({exc})", f"run `sae-atlas analyze {sae_dir} --restart`") from None
        return cls(folder, summary, features, examples, vocab, dark, partners, groups)


def _r(x: float, digits: int = 5) -> float:
    """Round to `digits` significant digits: JSON stays small, nothing visible is lost."""
    x = float(x)
    if not np.isfinite(x) or x == 0:
        return 0.0 if not np.isfinite(x) else x
    return float(f"{x:.{digits}g}")


def feature_rows(a: Analysis, sae_id: int) -> list[dict]:
    f = a.features
    n = len(f["count"])
    rows = []
    for i in range(n):
        count = int(f["count"][i])
        mx = float(f["max"][i])
        intervals = f["interval_count"][i]
        rows.append({
            "sae_id": sae_id,
            "index": i,
            "firing_count": count,
            "density": float(f["density"][i]),
            "mean_act": _r(f["mean"][i]),
            "max_act": _r(mx),
            "moments": {"e_a2": _r(f["e_a2"][i]), "std": _r(f["std"][i]), "skew": _r(f["skew"][i]),
                        "kurtosis": _r(f["kurtosis"][i])},
            "act_hist": {"max": _r(mx), "counts": f["hist"][i].tolist()},
            "interval_shares": [_r(c / count, 4) if count else 0.0 for c in intervals.tolist()],
            "logits": {
                "top": [[int(t), _r(v, 4)] for t, v in zip(f["logit_top_ids"][i], f["logit_top"][i])],
                "bottom": [[int(t), _r(v, 4)] for t, v in zip(f["logit_bottom_ids"][i], f["logit_bottom"][i])],
                "hist": {"lo": _r(f["logit_range"][i, 0], 4), "hi": _r(f["logit_range"][i, 1], 4),
                         "counts": f["logit_hist"][i].tolist()},
            },
            "neighbors": [[int(j), _r(c, 4)] for j, c in zip(f["neighbor_ids"][i], f["neighbor_cos"][i])],
            "peak_token_id": int(f["peak_token"][i]) if f["peak_token"][i] >= 0 else None,
            "peak_token_share": _r(f["peak_token_share"][i], 3),
        })
    return rows


def partner_rows(p: Partners) -> list[list]:
    """Per latent, [[j, N_ij, P(j | i), P(i | j), lift], ...] for latent_structure.partners."""
    return [[[j, n, _r(pji, 4), _r(pij, 4), _r(lift, 4)] for j, n, pji, pij, lift in p.stats(i)]
            for i in range(len(p.counts))]


def example_tuples(a: Analysis, feature_ids: np.ndarray):
    """Yield one tuple per example in store.publish.EXAMPLE_COLUMNS order, windows trimmed to their valid tokens."""
    e = a.examples
    tokens, acts = e["tokens"], e["acts"]
    valid = tokens >= 0
    width = tokens.shape[1]
    first = np.where(valid.any(1), valid.argmax(1), 0)
    last = np.where(valid.any(1), width - 1 - valid[:, ::-1].argmax(1), -1)
    feat = feature_ids[e["feature"]]
    for j in range(len(tokens)):
        lo, hi = int(first[j]), int(last[j]) + 1
        kind = int(e["kind"][j])
        yield (
            int(feat[j]), kind, int(e["rank"][j]), int(e["interval"][j]) if kind == ExampleKind.interval else None,
            float(e["activation"][j]), int(e["peak"][j]) - lo, int(e["doc_id"][j]), int(e["doc_pos"][j]),
            tokens[j, lo:hi].astype("<i4").tobytes(), acts[j, lo:hi].astype("<f2").tobytes(),
        )


def publish(sae_dir: str | Path, name: str, replace: bool = False, engine: Engine | None = None,
            description: str = "", progress: bool = True, explain: bool | None = None,
            relate: bool | None = None, lm=None, make_map: bool | None = None, score_sample: int | None = None,
            extra_config: dict | None = None) -> int:
    """Write an analysed SAE into the store; returns the new SAE's id."""
    return publish_many([(sae_dir, name)], replace, engine, description, progress, explain=explain,
                        relate=relate, lm=lm, make_map=make_map, score_sample=score_sample,
                        extra_config=extra_config)[0]


def publish_many(items: list[tuple[str | Path, str]], replace: bool = False, engine: Engine | None = None,
                 description: str = "", progress: bool = True, run_id: int | None = None,
                 before_commit: Callable[[Session], None] | None = None, explain: bool | None = None,
                 relate: bool | None = None, lm=None, make_map: bool | None = None,
                 score_sample: int | None = None, extra_config: dict | None = None,
                 per_item: list[dict] | None = None) -> list[int]:
    """Publish several analysed SAEs (a run's sweep) in one transaction: all of them or none.

    before_commit(session) runs last inside the transaction; raising there rolls everything back
    (the trainer worker uses it to mark its run done only if the run is still its own).
    explain (default: the publish_explanations setting) writes a token-pattern explanation for
    every latent with its embedding score (trainer.interpret.at_publish), computed before the
    transaction opens. make_map (default: the map_at_publish setting) lays out and clusters the
    latents (trainer/structure/layout.py), also before. score_sample: compute the embedding score of
    at most this many latents per SAE (the rest are stored as not computed; None: every latent).
    extra_config: keys added to each SAE's config (a transcoder set's block records its set there).
    per_item: one dict per item overriding `description` and `extra_config` for that SAE (the blocks
    of a transcoder set each say which block they are). Then, unless relate is False (None: the
    relate_at_publish setting), the new SAEs are related to their partners.
    """
    for _, name in items:
        writes.check_name(name)
    if per_item is not None and len(per_item) != len(items):
        raise ValueError(f"per_item has {len(per_item)} entries for {len(items)} items")
    options = [{"description": description, "extra_config": extra_config, **(o or {})} for o in (per_item or [None] * len(items))]
    engine = engine or get_engine()
    check_schema(engine)
    started = time.time()
    analyses = [Analysis.load(Path(sae_dir)) for sae_dir, _ in items]
    interpretations = _interpret(analyses, explain, progress, score_sample)
    make_map = get_settings().map_at_publish if make_map is None else make_map
    maps = [_map(Path(d), a, i) if make_map else None for (d, _), a, i in zip(items, analyses, interpretations)]
    ids, n_rows, n_examples = [], 0, 0
    try:
        with Session(engine) as session, session.begin():
            for (sae_dir, name), a, interp, m, o in zip(items, analyses, interpretations, maps, options):
                sae_id, rows, examples = _write_sae(session, engine, Path(sae_dir), name, replace, o["description"], run_id,
                                                    a, interp, m, o["extra_config"])
                ids.append(sae_id)
                n_rows += rows
                n_examples += examples
            if before_commit is not None:
                before_commit(session)
    except (OperationalError, DBAPIError, sqlite3.Error, psycopg.Error) as exc:
        # COPY and executemany run on the raw driver connection, so driver errors arrive unwrapped.
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()
        names = ", ".join(repr(n) for _, n in items)
        raise AtlasError(
            f"publishing {names} failed because the database at {describe(engine)} went away or refused the write "
            f"({detail[0][:200] if detail else type(exc).__name__}); nothing was written",
            "check the database and run the same command again",
        ) from None
    writes.analyze_after_bulk_load(engine)
    log.info("published %s: %d features, %d examples in %.1f s", ", ".join(n for _, n in items), n_rows, n_examples,
             time.time() - started)
    if relate if relate is not None else get_settings().relate_at_publish:
        from trainer.relate.published import relate_new

        relate_new([n for _, n in items], engine, lm=lm, progress=progress)
    return ids


def _interpret(analyses: list[Analysis], explain: bool | None, progress: bool, score_sample: int | None = None) -> list:
    """The interpretation step (token-pattern explanations, embedding scores) of each analysis, or Nones."""
    from store.settings import get_settings

    if not (get_settings().publish_explanations if explain is None else explain):
        return [None] * len(analyses)
    from trainer.interpret import at_publish
    from trainer.interpret.embedder import EmbeddingModelMissing, check_embedder

    try:
        embedder = check_embedder()
        return [at_publish.prepare(a.examples, a.features, a.vocab, embedder, progress, score_sample=score_sample)
                for a in analyses]
    except EmbeddingModelMissing as exc:
        raise AtlasError(f"cannot explain the latents at publish: {exc.message}",
                         f"{exc.hint}; or publish without explanations (SAE_ATLAS_PUBLISH_EXPLANATIONS=false)") from None


def _map(sae_dir: Path, a: Analysis, interp) -> dict | None:
    """The SAE's map (trainer/structure/layout.py), labelled from the explanations written at publish,
    else from each latent's peak token; None when the SAE's weights are not beside the analysis."""
    from trainer.formats import load_sae
    from trainer.structure.layout import build_map, label_texts

    started = time.time()
    try:
        directions = load_sae(sae_dir).sae.W_dec.detach().float().cpu().numpy()
    except (AtlasError, OSError) as exc:
        log.warning("no map for %s: its weights cannot be read (%s)", sae_dir, exc)
        return None
    peak = a.features["peak_token"]
    texts = label_texts(interp.texts if interp is not None else [None] * len(peak),
                        [a.vocab[p] if 0 <= p < len(a.vocab) else None for p in peak.tolist()])
    m = build_map(directions, a.features["neighbor_ids"], a.features["neighbor_cos"], a.partners, texts)
    log.info("map of %s: %d latents, %d clusters in %.1f s", sae_dir, len(peak), len(m["clusters"]), time.time() - started)
    return m


def _write_sae(session: Session, engine: Engine, sae_dir: Path, name: str, replace: bool, description: str,
               run_id: int | None, a: Analysis, interp=None, structure_map: dict | None = None,
               extra_config: dict | None = None) -> tuple[int, int, int]:
    s = a.summary
    writes.clear_name(session, name, replace)
    lm = writes.get_or_create_lm(session, s["lm"], a.vocab)
    sae_info = s["sae"]
    site = sae_info["site"]
    sae = SAE(
        name=name, lm_id=lm.id, site=site, layer=int(site.split(".")[1]), architecture=sae_info["architecture"],
        d_in=sae_info["d_in"], d_sae=sae_info["d_sae"], k=sae_info.get("k"),
        config={"sae": sae_info.get("config", {}), "training": sae_info.get("training", {}),
                "analysis": s["analysis"], "source_format": sae_info.get("source_format"), **(extra_config or {})},
        norm_scale=float(sae_info.get("norm_scale", 1.0)),
        metrics=s.get("metrics", {}),
        charts={"log_density_hist": s["log_density_hist"], "dead": s["dead"], "dense": s["dense"]},
        weights_path=str(sae_dir.resolve()), n_tokens_analyzed=int(s["analysis"]["n_tokens"]),
        status=SAEStatus.publishing.value, version=uuid.uuid4().hex, description=description, run_id=run_id,
    )
    session.add(sae)
    session.flush()
    rows = feature_rows(a, sae.id)
    ids = writes.insert_features(session, rows)
    n_examples = writes.insert_examples(session, engine, example_tuples(a, ids))
    if interp is not None:
        from trainer.interpret import at_publish

        at_publish.write(session, sae, ids, interp)
    if a.dark_matter is not None:
        session.add(SAEDarkMatter(sae_id=sae.id, data=writes.clean_json(a.dark_matter)))
    m = structure_map
    if a.partners is not None or m is not None:
        partners = partner_rows(a.partners) if a.partners is not None else [[] for _ in rows]
        writes.insert_structure(session, sae.id, partners, np.column_stack([m["x"], m["y"]]) if m else None,
                                m["cluster"] if m else None)
    if m is not None:
        writes.insert_map(session, sae.id, m["config"], m["clusters"])
    if a.groups:
        writes.insert_groups(session, sae.id, a.groups["groups"])
    writes.mark_ready(session, sae)
    return sae.id, len(rows), n_examples
