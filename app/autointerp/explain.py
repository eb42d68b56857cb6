"""The explain job: a feature's examples -> explanation -> detection and fuzzing scores -> the store.

`run_explain_job` is what a worker runs for one claimed job. Database work happens in threads so
the worker's event loop keeps heartbeating; the results and the job's completion are written in
ONE transaction that first checks the job is still ours, so a job whose lease was lost (or that
was cancelled) leaves no explanation behind and a job is never stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, case, insert, select, update
from sqlalchemy.orm import Session

from app.autointerp import queue
from app.autointerp.backends import Backend
from app.autointerp.prompts import (
    ExampleSplit,
    PromptConfig,
    StoredExample,
    TooFewExamples,
    Window,
    clean_explanation,
    explain_messages,
    messages_text,
    method_name,
    split_examples,
    to_window,
)
from app.autointerp.scoring import Score, detection, fuzzing
from store.models import SAE, Example, ExampleKind, Explanation, Feature, Judgement
from store import vocab_for
from store.vectors import document_text
from trainer.interpret import embedding_scorer, token_pattern, windows

log = logging.getLogger(__name__)

# Greedy decoding repeats itself: when a job is retried after an unusable answer, sample instead.
RETRY_TEMPERATURE = 0.7


@dataclass(frozen=True)
class JobRef:
    """What a handler needs of a claimed job (plain values: no ORM object crosses threads)."""

    id: int
    feature_id: int
    sae_id: int
    attempts: int
    max_attempts: int
    params: dict = field(default_factory=dict)


class LeaseLost(Exception):
    """The job is no longer ours (lease expired and re-leased, or cancelled): its work is dropped."""


class FeatureGone(Exception):
    """The job's feature was deleted (its SAE replaced) after the job was queued: nothing to retry."""

    retryable = False


@dataclass
class FeatureData:
    sae_name: str
    index: int
    feature_id: int
    max_act: float
    density: float
    split: ExampleSplit
    negatives: list[Window]  # the judges'
    negative_sources: dict[str, int]
    statistics: list[str] = field(default_factory=list)  # token_pattern.prompt_lines
    # the embedding scorer's windows: the same as the token-pattern explanation's (windows.select)
    scoring_pos: list[str] = field(default_factory=list)
    scoring_neg: list[str] = field(default_factory=list)
    baseline: dict | None = None  # the SAE's shuffled-explanation baseline (metrics["autointerp"])


# --- loading ----------------------------------------------------------------------------------

def _stored(row) -> StoredExample:
    return StoredExample(id=row.id, kind=row.kind, rank=row.rank, interval=row.interval, activation=row.activation,
                         peak=row.peak, doc_id=row.doc_id, doc_offset=row.doc_offset,
                         token_ids=np.frombuffer(row.token_ids, dtype="<i4"),
                         acts=np.frombuffer(row.acts, dtype="<f2").astype(np.float32))


def load_feature_data(engine: Engine, job: JobRef, cfg: PromptConfig) -> FeatureData:
    with Session(engine) as session:
        feature = session.get(Feature, job.feature_id)
        if feature is None:
            raise FeatureGone(f"feature {job.feature_id} no longer exists (its SAE was replaced or deleted)")
        sae = session.get(SAE, feature.sae_id)
        vocab = vocab_for(session, sae.lm_id)
        rows = session.scalars(select(Example).where(Example.feature_id == feature.id)).all()
        own = [_stored(r) for r in rows]
        window = windows.scoring_window()
        split = split_examples(own, vocab.text, cfg, feature.index, window)
        data = FeatureData(sae_name=sae.name, index=feature.index, feature_id=feature.id, max_act=feature.max_act,
                           density=feature.density, split=split, negatives=[], negative_sources={},
                           statistics=feature_statistics(feature, split.shown, vocab.text))
        pick_negatives(session, sae, feature, data, vocab, cfg, window)
        if not data.negatives:
            raise TooFewExamples(f"latent {feature.index} of {sae.name!r}: no non-activating contexts to score against")
        auto = (sae.metrics or {}).get("autointerp") or {}
        data.baseline = {k: auto.get(k) for k in ("shuffled_mean", "shuffled_std", "true_mean", "n", "explainer")} \
            if auto else None
        return data


def feature_statistics(feature: Feature, shown: list[StoredExample], vocab_text) -> list[str]:
    """The token statistics of the top examples the explainer is shown (never of held-out ones), as
    lines for its prompt."""
    tops = [e for e in shown if e.kind == ExampleKind.top and len(e.token_ids)] \
        or [e for e in shown if len(e.token_ids)]
    promotes = np.asarray([[int(t) for t, _ in (feature.logits or {}).get("top", [])][:token_pattern.MAX_PROMOTED]
                           or [-1]], np.int64)
    if not tops:
        return []
    width = max(len(e.token_ids) for e in tops)
    tokens = np.full((len(tops), width), -1, np.int64)
    for r, e in enumerate(tops):
        tokens[r, :len(e.token_ids)] = e.token_ids
    (stats,) = token_pattern.stats_from_windows(np.zeros(len(tops), np.int64), tokens,
                                                np.asarray([e.peak for e in tops]), 1, promotes)
    return token_pattern.prompt_lines(stats, vocab_text)


def pick_negatives(session: Session, sae: SAE, feature: Feature, data: FeatureData, vocab, cfg: PromptConfig,
                   window: int) -> None:
    """Non-activating windows for the judges and the embedding scorer (data.negatives, scoring_*),
    by the picker publish scores token-pattern explanations with (trainer.interpret.windows).

    The embedding scorer gets exactly publish's windows. The judges read cfg.window tokens of each
    negative, where another latent's window is likelier to hold an unseen activation of this one,
    so theirs are picked again with the contamination limit applied to that length.
    """
    split = data.split
    own, rows = split.own, np.arange(len(split.examples))
    neighbors = [int(j) for j, _ in (feature.neighbors or [])]
    others: dict[int, tuple[windows.Examples, list[StoredExample], windows.Win | None]] = {}

    def first_positive(latents: list[int]) -> dict[int, windows.Win]:
        todo = [j for j in latents if j not in others]
        if todo:
            found: dict[int, list[StoredExample]] = {j: [] for j in todo}
            for ex, idx in session.execute(
                    select(Example, Feature.index).join(Feature, Example.feature_id == Feature.id)
                    .where(Feature.sae_id == sae.id, Feature.index.in_(todo))).all():
                found[idx].append(_stored(ex))
            for j, exs in found.items():
                ex = windows.Examples.from_rows(exs, [j] * len(exs))
                first = windows.positives(ex, np.arange(len(exs)), 1, window)
                others[j] = (ex, exs, first[0] if first else None)
        return {j: others[j][2] for j in latents if others[j][2] is not None}

    def pick(n: int, shown: int | None) -> tuple[list[windows.Win], str]:
        return windows.negatives(own, rows, feature.index, feature.density, neighbors, sae.d_sae, n,
                                 first_positive, cfg.seed, window, exclude=[w.key for w in split.positives],
                                 shown=shown)

    def examples_of(w: windows.Win) -> tuple[windows.Examples, list[StoredExample]]:
        return (own, split.examples) if w.latent == feature.index else others[w.latent][:2]

    scoring, _ = pick(windows.N_NEG, None)
    data.scoring_pos = [own.text(w, vocab.raw) for w in split.positives[:windows.N_POS]]
    data.scoring_neg = [examples_of(w)[0].text(w, vocab.raw) for w in scoring]
    n = max(1, len(split.held_out))
    judged, source = pick(4 * n, max(cfg.window, window))  # spares: short zero stretches are left out
    for w in judged:
        if len(data.negatives) >= n:
            break
        ex, stored = examples_of(w)
        if w.latent == feature.index:  # a stretch of its own window where it is 0, as long as the judges read
            lo, hi = windows.zero_stretch(ex, w, cfg.window)
            if hi - lo < max(8, cfg.window // 2):  # much shorter than a positive: its length would give it away
                continue
            win = to_window(stored[w.row], vocab.text, cfg, activating=False, source="negative:own-zero-run",
                            zero_acts=True, cut=(lo, hi))
        else:
            win = to_window(stored[w.row], vocab.text, cfg, activating=False, source=f"negative:feature {w.latent}",
                            zero_acts=True)
        data.negatives.append(Window(win.tokens, win.acts, False, win.source, None, win.doc_id, win.start))
    data.negative_sources = {source: len(data.negatives)} if data.negatives else {}


# --- storing ----------------------------------------------------------------------------------

def update_feature_best(session: Session, feature_id: int) -> None:
    """Feature.explanation / best_score := the explanation with the best informative detection score;
    without one, the best embedding score (every explanation has one); newest on ties. An
    uninformative detection score (the judge answered everything alike) never counts."""
    informative = case((Explanation.detection_uninformative.is_(True), None), else_=Explanation.detection_score)
    best = session.execute(select(Explanation.text, informative.label("detection"))
                           .where(Explanation.feature_id == feature_id)
                           .order_by(informative.desc().nulls_last(), Explanation.embedding_score.desc().nulls_last(),
                                     Explanation.id.desc())
                           .limit(1)).first()
    session.execute(update(Feature).where(Feature.id == feature_id).values(
        explanation=best.text if best else None, best_score=best.detection if best else None))


def store_result(engine: Engine, job: JobRef, worker_id: str, text: str, explainer: str, prompt: str, raw: str,
                 det: Score, fuzz: Score, result: dict, method: str,
                 embedding: EmbeddingResult | None = None) -> int:
    """Explanation + judgements + embedding + feature update + job done, in one transaction.
    Returns the explanation id."""
    from store.vectors import write_embeddings

    scores = {"detection": det.summary(), "fuzzing": fuzz.summary()}
    if embedding is not None:
        scores["embedding"] = embedding.summary

    def attempt() -> int:
        with Session(engine) as session:
            with session.begin():
                expl = Explanation(feature_id=job.feature_id, text=text, method=method, explainer=explainer,
                                   prompt=prompt, raw_response=raw, detection_score=det.balanced_accuracy,
                                   detection_f1=det.f1, fuzzing_score=fuzz.balanced_accuracy, fuzzing_f1=fuzz.f1,
                                   detection_uninformative=det.uninformative,
                                   fuzzing_uninformative=fuzz.uninformative,
                                   embedding_score=embedding.auroc if embedding else None, scores=scores)
                session.add(expl)
                session.flush()
                if embedding is not None:
                    write_embeddings(session, [expl.id], [job.sae_id], embedding.vector[None, :], embedding.model)
                rows = [{"explanation_id": expl.id, "method": j.method, "example_id": j.example_id, "text": j.text,
                         "truth": j.truth, "prediction": j.prediction, "correct": j.correct, "raw": j.raw}
                        for j in det.items + fuzz.items]
                if rows:
                    session.execute(insert(Judgement), rows)
                update_feature_best(session, job.feature_id)
                if not queue.finish(session, job.id, worker_id, {**result, "explanation_id": expl.id}):
                    raise LeaseLost(f"job {job.id} is no longer leased to {worker_id}")
                return expl.id

    return queue.retry_busy(attempt)


# --- the job ----------------------------------------------------------------------------------

async def run_explain_job(job: JobRef, backend: Backend, engine: Engine, worker_id: str) -> dict:
    """Explain and score one feature; returns the job's result (already committed with the job)."""
    started = time.perf_counter()
    cfg = PromptConfig.for_backend(backend.kind, job.params)
    data = await asyncio.to_thread(load_feature_data, engine, job, cfg)
    split = data.split
    messages = explain_messages(split.explain, cfg, scale=data.max_act, statistics=data.statistics)
    temperature = 0.0 if job.attempts <= 1 else RETRY_TEMPERATURE
    raw = await backend.complete(messages, cfg.explain_max_tokens, "explain", temperature)
    text = clean_explanation(raw, cfg)
    seed = cfg.seed * 1_000_003 + data.feature_id
    positives = split.held_out
    # Both scorers at once: an HTTP backend overlaps their requests (up to llm_concurrency).
    det, fuzz = await asyncio.gather(detection(backend, text, positives, data.negatives, cfg, seed),
                                     fuzzing(backend, text, positives, data.negatives, cfg, seed))
    embedding = await asyncio.to_thread(embedding_score, text, data.scoring_pos, data.scoring_neg, data.baseline)
    result = {
        "text": text,
        "detection": det.summary(), "fuzzing": fuzz.summary(),
        "embedding": embedding.summary if embedding else None,
        "n_explain": len(split.explain), "n_held_out": len(positives), "n_negatives": len(data.negatives),
        "negatives_from": data.negative_sources,
        "explainer": f"{backend.kind}:{backend.model_name('explain')}", "judge": backend.model_name("judge"),
        "worker": worker_id, "seconds": round(time.perf_counter() - started, 3),
    }
    explanation_id = await asyncio.to_thread(
        store_result, engine, job, worker_id, text, result["explainer"], messages_text(messages), raw, det, fuzz,
        result, method_name(cfg), embedding)
    result["explanation_id"] = explanation_id
    log.info("job %d: latent %d of %s -> %r (detection %s, fuzzing %s, embedding %s) in %.1f s", job.id, data.index,
             data.sae_name, text, _fmt(det.balanced_accuracy), _fmt(fuzz.balanced_accuracy),
             _fmt(embedding.auroc if embedding else None), result["seconds"])
    return result


@dataclass
class EmbeddingResult:
    auroc: float | None
    vector: np.ndarray  # the explanation's embedding (for semantic search)
    model: str
    summary: dict


def embedding_score(text: str, positives: list[str], negatives: list[str],
                    baseline: dict | None) -> EmbeddingResult | None:
    """The embedding scorer on the feature's scoring windows (the token-pattern explanation's); None
    (logged) when no embedding model is available."""
    from trainer.interpret.embedder import EmbeddingUnavailable, get_embedder

    embedder = get_embedder()
    try:
        vecs = embedder.embed([embedding_scorer.query_text(text), document_text(text)]
                              + positives + negatives)
    except EmbeddingUnavailable as exc:
        log.warning("no embedding score or search vector for this explanation: %s", exc.one_line())
        return None
    query, doc, wins = vecs[0], vecs[1], vecs[2:]
    sims = wins @ query
    auroc = embedding_scorer.auroc(sims[:len(positives)], sims[len(positives):])
    return EmbeddingResult(auroc=auroc, vector=doc, model=embedder.name, summary={
        "auroc": auroc, "n_pos": len(positives), "n_neg": len(negatives), "model": embedder.name,
        "window": windows.scoring_window(), "baseline": baseline})


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
