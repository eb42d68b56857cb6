"""The explain job: a feature's examples -> explanation -> detection and fuzzing scores -> the store.

`run_explain_job` is what a worker runs for one claimed job. Database work happens in threads so
the worker's event loop keeps heartbeating; the results and the job's completion are written in
ONE transaction that first checks the job is still ours, so a job whose lease was lost (or that
was cancelled) leaves no explanation behind and a job is never stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, case, insert, select, update
from sqlalchemy.orm import Session

from app.autointerp import queue
from app.autointerp.backends import Backend
from app.autointerp.prompts import (
    KIND_RANDOM,
    KIND_TOP,
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
    zero_runs,
)
from app.autointerp.scoring import Score, detection, fuzzing
from store.models import SAE, Example, Explanation, Feature, Judgement
from store import vocab_for
from trainer.interpret import embedding_scorer, token_pattern
from trainer.interpret.windows import centred_start, scoring_window

log = logging.getLogger(__name__)

# Greedy decoding repeats itself: when a job is retried after an unusable answer, sample instead.
RETRY_TEMPERATURE = 0.7
# Other features' windows are used as negatives only when this feature is unlikely to fire in them.
MAX_NEGATIVE_CONTAMINATION = 0.2


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
    negatives: list[Window]
    negative_sources: dict[str, int]
    statistics: list[str] = field(default_factory=list)  # token_pattern.prompt_lines
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
        seed = cfg.seed * 1_000_003 + feature.id
        split = split_examples(own, vocab.text, cfg, seed)
        negatives, sources = pick_negatives(session, sae, feature, own, vocab.text, cfg,
                                            max(1, len(split.held_out)), random.Random(seed))
        if not negatives:
            raise TooFewExamples(f"latent {feature.index} of {sae.name!r}: no non-activating contexts to score against")
        auto = (sae.metrics or {}).get("autointerp") or {}
        baseline = {k: auto.get(k) for k in ("shuffled_mean", "shuffled_std", "true_mean", "n", "explainer")} \
            if auto else None
        return FeatureData(sae_name=sae.name, index=feature.index, feature_id=feature.id, max_act=feature.max_act,
                           density=feature.density, split=split, negatives=negatives, negative_sources=sources,
                           statistics=feature_statistics(feature, own, vocab.text), baseline=baseline)


def feature_statistics(feature: Feature, own: list[StoredExample], vocab_text) -> list[str]:
    """The token statistics of the feature's top examples, as lines for the explainer's prompt."""
    tops = [e for e in own if e.kind == KIND_TOP and len(e.token_ids)]
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


def pick_negatives(session: Session, sae: SAE, feature: Feature, own: list[StoredExample], vocab_text,
                   cfg: PromptConfig, n: int, rng: random.Random) -> tuple[list[Window], dict[str, int]]:
    """Non-activating windows for scoring.

    The store keeps no separate negatives, so they come from (1) other features' stored windows,
    cut like the positives, and (2) stretches of this feature's own windows where it is exactly 0.
    For (1) this feature's activation is NOT stored: it is assumed 0. That is true unless it fires
    somewhere in the window, which has probability ~1-(1-density)^window; so (1) is used only for
    sparse features (MAX_NEGATIVE_CONTAMINATION), never from near neighbours (similar directions
    co-fire), and never where a window overlaps one of this feature's own activating windows.
    (2) is certain but shares documents with the positives (hard negatives); it fills the rest.
    """
    out: list[Window] = []
    sources = {"other_features": 0, "own_zero_runs": 0}
    own_spans = [(e.doc_id, *e.span) for e in own]
    neg_spans: list[tuple[int, int, int]] = []

    def overlaps(span: tuple[int, int, int], spans) -> bool:
        return any(d == span[0] and span[1] < h and lo < span[2] for d, lo, h in spans)

    def add(w: Window, source: str) -> None:
        out.append(w)
        neg_spans.append((w.doc_id, w.start, w.start + len(w.tokens)))
        sources[source] += 1

    contamination = 1.0 - (1.0 - min(max(feature.density, 0.0), 1.0)) ** cfg.window
    if contamination <= MAX_NEGATIVE_CONTAMINATION and sae.d_sae > 1:
        exclude = {feature.index} | {int(j) for j, _ in (feature.neighbors or [])[:10]}
        wanted = min(4 * n, sae.d_sae - len(exclude))
        picks: list[int] = []
        for _ in range(20 * n):
            if len(picks) >= wanted:
                break
            i = rng.randrange(sae.d_sae)
            if i not in exclude and i not in picks:
                picks.append(i)
        if picks:
            rows = session.execute(
                select(Example, Feature.index).join(Feature, Example.feature_id == Feature.id)
                .where(Feature.sae_id == sae.id, Feature.index.in_(picks), Example.kind.in_([KIND_TOP, KIND_RANDOM]),
                       Example.rank < 2)).all()
            by_feature: dict[int, list[StoredExample]] = {}
            for ex, idx in rows:
                by_feature.setdefault(idx, []).append(_stored(ex))
            for idx in picks:  # in the random order of picks, at most one window per other feature
                if len(out) >= n:
                    break
                for ex in by_feature.get(idx, []):
                    w = to_window(ex, vocab_text, cfg, activating=False, source=f"negative:feature {idx}",
                                  zero_acts=True)
                    w = Window(w.tokens, w.acts, False, w.source, None, w.doc_id, w.start)  # not this feature's example
                    span = (w.doc_id, w.start, w.start + len(w.tokens))
                    if not overlaps(span, own_spans) and not overlaps(span, neg_spans):
                        add(w, "other_features")
                        break
    if len(out) < n:
        runs = [w for e in own for w in zero_runs(e, vocab_text, cfg, min_len=max(8, cfg.window // 2))]
        rng.shuffle(runs)
        for w in runs:
            if len(out) >= n:
                break
            if not overlaps((w.doc_id, w.start, w.start + len(w.tokens)), neg_spans):
                add(w, "own_zero_runs")
    return out, sources


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
                 det: Score, fuzz: Score, result: dict, method: str = "explain-v1",
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
    embedding = await asyncio.to_thread(embedding_score, text, positives, data.negatives, data.baseline)
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


def window_plain_text(w: Window, length: int | None = None) -> str:
    """A window as the embedding scorer sees it: its tokens joined, no marks, cut to `length` tokens
    around its strongest activation (peak 3/4 of the way in; the middle of a non-activating one),
    so that an LM's explanation is scored on windows as long as the token-pattern ones scored at
    publish (windows.py), and the two scores and the SAE's shuffled baseline compare."""
    tokens = list(w.tokens)
    if length is not None and len(tokens) > length:
        acts = list(w.acts)
        peak = max(range(len(acts)), key=acts.__getitem__) if acts and max(acts) > 0 else len(tokens) // 2
        lo = int(centred_start(peak, len(tokens), length))
        tokens = tokens[lo:lo + length]
    return "".join(tokens).replace("\\n", "\n").replace("\\t", "\t")


def embedding_score(text: str, positives: list[Window], negatives: list[Window],
                    baseline: dict | None) -> EmbeddingResult | None:
    """The embedding scorer on the job's held-out windows; None (logged) when no embedding model is available."""
    from trainer.interpret.embedder import EmbeddingUnavailable, get_embedder

    embedder = get_embedder()
    length = scoring_window()
    try:
        vecs = embedder.embed([embedding_scorer.query_text(text), embedding_scorer.document_text(text)]
                              + [window_plain_text(w, length) for w in positives + negatives])
    except EmbeddingUnavailable as exc:
        log.warning("no embedding score or search vector for this explanation: %s", exc.one_line())
        return None
    query, doc, windows = vecs[0], vecs[1], vecs[2:]
    sims = windows @ query
    auroc = embedding_scorer.auroc(sims[:len(positives)], sims[len(positives):])
    return EmbeddingResult(auroc=auroc, vector=doc, model=embedder.name, summary={
        "auroc": auroc, "n_pos": len(positives), "n_neg": len(negatives), "model": embedder.name, "window": length,
        "baseline": baseline})


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
