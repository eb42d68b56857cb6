"""`sae-atlas demo`: build the demo atlas once (train, analyse, relate, publish), then serve it.

The demo trains a width sweep of TopK SAEs (k=32; 2 x 576 and 8 x 576 latents) at two adjacent
layers of the bundled SmolLM2-135M-Instruct's residual stream (after blocks 14 and 15), reading
the documentation that ships with Python (pydoc). The LM runs over the corpus once: the held-out
documents and then the training documents go through it with both sites hooked into the on-disk
activation cache, and everything after that reads the cache: training and its evaluation, the
four analyses (with what each SAE misses), and the relations between the four SAEs (two width
pairs and two layer pairs), computed as they are published. The pydoc corpus is small (about
0.57 M tokens), so the dashboards are computed over all of it; the SAEs' metrics come from the
held-out documents.

With `--circuits` (`make demo-circuits`) the transcoder stage follows (app.demo_transcoders): a TopK skip-transcoder for every one of the 30
blocks' MLPs, trained streaming from one more LM pass (the activation cache would need 60 sites),
published and registered as a transcoder set, and three example attribution graphs through it (a
Python completion, a closing bracket, a word in prose), each stored with a caption, pins and
supernodes computed from the graph. Each stage runs only when its results are missing, so an atlas
built before the transcoder stage existed gets only that stage; later runs find everything and
start the server in seconds. The stage is opt-in because it does not fit `make demo`'s time: on
the 2-core AMD EPYC here it takes about 50 min on two threads, most of it training on 1,048,576 tokens
(BENCHMARKS.md, "The demo's transcoder set and example graphs")."""

from __future__ import annotations

import json
import logging
import os
import time
import dataclasses
from pathlib import Path

from sqlalchemy import select

from store.db import current_revision, get_engine, head_revision, session_scope, upgrade
from store.models import SAE, SAEStatus
from store.settings import get_settings

log = logging.getLogger(__name__)

DEMO_NAME = "smollm2-135m-resid15-topk"  # the 8 x 576 SAE at layer 15 (tests and docs name it)
DEMO_LAYERS = (14, 15)
DEMO_WIDTHS = (1152, 4608)
DEMO_K = 32
DEMO_TRAIN = dict(model="smollm2-135m", site=[f"resid_post.{layer}" for layer in DEMO_LAYERS], arch=["topk"], k=[DEMO_K],
                  width=list(DEMO_WIDTHS), tokens=1_000_000, batch_size=4096, corpus="pydoc", eval_fraction=0.1,
                  cache_activations=True)
DEMO_ANALYZE = dict(split="all", tokens=1_000_000, cache_activations=True)


def demo_names() -> dict[tuple[int, int], str]:
    """(layer, width) -> published name of every demo SAE."""
    out = {}
    for layer in DEMO_LAYERS:
        for width in DEMO_WIDTHS:
            name = f"smollm2-135m-resid{layer}-topk"
            out[(layer, width)] = name if width == max(DEMO_WIDTHS) else f"{name}-w{width}"
    return out


def demo_folders() -> dict[tuple[int, int], Path]:
    """(layer, width) -> the folder `make demo` trains and analyses that SAE in (d_in 576: SmolLM2-135M)."""
    from trainer.config import sae_name
    from trainer.sae import SAEConfig

    out = get_settings().data_dir / "demo" / "sweep"
    return {(layer, width): out / sae_name(f"resid_post.{layer}", SAEConfig(d_in=576, d_sae=width, k=DEMO_K))
            for layer in DEMO_LAYERS for width in DEMO_WIDTHS}


def demo_ready(circuits: bool = False) -> bool:
    """Every stage asked for is done: the four SAEs published and, with circuits, the transcoder set
    registered and its graphs stored."""
    from app.demo_transcoders import transcoders_ready

    return saes_ready() and (not circuits or transcoders_ready())


def saes_ready() -> bool:
    names = list(demo_names().values())
    with session_scope() as session:
        ready = session.scalars(select(SAE.name).where(SAE.name.in_(names), SAE.status == SAEStatus.ready.value)).all()
        return set(ready) == set(names)


def _step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_demo(rebuild: bool = False, tokens: int | None = None, circuits: bool = False) -> None:
    """Build what the demo atlas lacks (everything with rebuild): the four SAEs, then with circuits
    the transcoder set and its example graphs (app.demo_transcoders)."""
    from app.demo_transcoders import DEMO_SET, build_transcoders, demo_graph_summary, transcoders_ready
    from trainer.lm import load_lm

    engine = get_engine()
    if current_revision(engine) != head_revision():
        _step("creating the store (sae-atlas db upgrade)")
        upgrade(engine)
    if demo_ready(circuits) and not rebuild:
        with_set = f"; transcoder set {DEMO_SET}" if transcoders_ready() else ""
        print(f"The demo atlas is ready ({', '.join(demo_names().values())}{with_set}).", flush=True)
        store_demo_report_cards()  # an atlas built before the demo stored them gets them now (no LM pass)
        ensure_demo_key()
        return
    started = time.time()
    _step("loading SmolLM2-135M-Instruct (the first run converts the bundled GGUF, ~20 s)")
    lm = load_lm("smollm2-135m")
    if rebuild or not saes_ready():
        stage = time.time()
        build_saes(lm, rebuild, tokens)
        print(f"\nThe four SAEs took {time.time() - stage:.0f} s.", flush=True)
    if circuits and (rebuild or not transcoders_ready()):
        stage = time.time()
        timings: dict = {}
        slugs = build_transcoders(lm, rebuild=rebuild, timings=timings)
        print(f"\nThe transcoder set and its example graphs took {time.time() - stage:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if isinstance(v, float))}):\n"
              f"{demo_graph_summary(slugs)}", flush=True)
    print(f"\nDemo atlas built in {time.time() - started:.0f} s.", flush=True)
    ensure_demo_key()


def build_saes(lm, rebuild: bool = False, tokens: int | None = None) -> None:
    """The four SAEs: one LM pass into the activation cache, training, analyses, publishing."""
    from trainer.activations import ActivationCache, LMStreamSpec
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.publish import publish
    from trainer.train import TrainConfig, train

    settings = get_settings()
    out = settings.data_dir / "demo" / "sweep"
    cfg = TrainConfig(out=out, overwrite=out.exists(), **{**DEMO_TRAIN, **({"tokens": tokens} if tokens else {})})
    folders = demo_folders()
    done = all((f / "metrics.json").is_file() and (f / "cfg.json").is_file() for f in folders.values())
    if rebuild or not done:
        _step(f"one LM pass over the held-out documents into the activation cache ({', '.join(cfg.site)})")
        held_out = LMStreamSpec(model=cfg.model, sites=list(cfg.site), corpus=cfg.corpus, text_field=cfg.text_field,
                                ctx_len=cfg.ctx_len, split="eval", eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                exclude_bos=cfg.exclude_bos, sink_norm_ratio=cfg.sink_norm_ratio, lm_dtype=str(lm.dtype))
        ActivationCache(settings.data_dir / "activations", held_out).fill(lm, 10**9, cfg.lm_batch_size,
                                                                          desc="caching held-out activations")
        _step("the same over the training documents (the whole split, whatever the training tokens)")
        ActivationCache(settings.data_dir / "activations", dataclasses.replace(held_out, split="train")).fill(
            lm, 10**9, cfg.lm_batch_size, desc="caching training activations")
        _step(f"training {len(folders)} TopK SAEs (widths {', '.join(map(str, DEMO_WIDTHS))} at layers "
              f"{' and '.join(map(str, DEMO_LAYERS))}) from the cache")
        train(cfg, lm=lm)
    names = demo_names()
    for key, folder in folders.items():
        _step(f"dashboards and what it misses for {names[key]}, from the activation cache")
        analyze(AnalyzeConfig(sae_dir=folder, restart=rebuild, **DEMO_ANALYZE), lm=lm)
    for key, folder in folders.items():
        _step(f"publishing {names[key]} (and relating it to the SAEs published before it)")
        publish(folder, names[key], replace=True, lm=lm,
                description=f"Demo: SmolLM2-135M-Instruct, Python documentation, layer {key[0]}, {key[1]:,} latents")
    store_demo_report_cards(lm)
    queue_demo_explanations()
    metrics = json.loads((folders[(max(DEMO_LAYERS), max(DEMO_WIDTHS))] / "metrics.json").read_text())
    print(f"\n{DEMO_NAME} has FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, "
          f"CE recovered {metrics.get('ce_recovered', float('nan')):.1%}.", flush=True)


def store_demo_report_cards(lm=None) -> None:
    """Store each demo SAE's report card, taken from its training run's held-out evaluation
    (trainer.report_card.card_from_training: the same code on the same split, so no second LM pass),
    for every demo SAE that has none yet."""
    from store.evaluations import latest_evaluation, weights_folder, write_evaluation
    from trainer.report_card import EvaluateConfig, card_from_training

    started, stored = time.time(), []
    for name in demo_names().values():
        with session_scope() as session:
            sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
            if sae is None or latest_evaluation(session, sae.id) is not None:
                continue
            card = card_from_training(EvaluateConfig(sae_dir=weights_folder(sae), from_training=True), lm=lm,
                                      progress=False)
            write_evaluation(session, sae.id, card.settings, card.metrics, card.n_tokens)
            stored.append(name)
    if stored:
        print(f"Stored the report cards of {', '.join(stored)} from their training evaluations "
              f"({time.time() - started:.1f} s).", flush=True)


def ensure_demo_key() -> None:
    """A local API key for the demo's 'request an explanation' button, kept in DATA_DIR (mode 600)."""
    from app.security import create_key

    path: Path = get_settings().data_dir / "demo-api-key.txt"
    if path.is_file():
        print(f"Demo API key (for 'Request an explanation'): {path.read_text().strip()}", flush=True)
        return
    with session_scope() as session:
        from store.models import APIKey

        existing = session.scalar(select(APIKey).where(APIKey.name == "demo"))
        if existing is not None:
            return
        key = create_key(session, "demo")
    path.write_text(key + "\n")
    os.chmod(path, 0o600)
    print(f"Demo API key (for 'Request an explanation'): {key}  (saved in {path})", flush=True)


DEMO_LM_EXPLANATIONS = 32  # most frequent latents the demo's worker explains with the local LM
DEMO_LM_PRIORITY = -10  # below "Request an explanation" (priority 10): a user's click goes first


def queue_demo_explanations(n: int = DEMO_LM_EXPLANATIONS) -> None:
    """Queue LM explain jobs for the demo SAE's most frequent (not dense) latents at a low priority.

    Publishing already gave every latent a token-pattern explanation and an embedding score; the
    demo's worker (started beside the server) adds LM explanations in the background.
    """
    from app.autointerp import queue
    from store.models import Feature

    with session_scope() as session:
        sae = session.scalar(select(SAE).where(SAE.name == DEMO_NAME, SAE.status == SAEStatus.ready.value))
        if sae is None:
            return
        picks = list(session.scalars(select(Feature.index).where(Feature.sae_id == sae.id, Feature.density < 0.1,
                                                                 Feature.firing_count > 0)
                                     .order_by(Feature.firing_count.desc(), Feature.index).limit(n)))
        created, _ = queue.enqueue_for_sae(session, DEMO_NAME, indices=picks, priority=DEMO_LM_PRIORITY,
                                           requested_by="demo")
    print(f"Queued {created} LM explanations of the most frequent latents for the demo's worker "
          "(every latent already has a token-pattern explanation).", flush=True)
