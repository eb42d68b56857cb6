"""`sae-atlas demo`: build the demo atlas once (train, analyse, publish), then serve it.

The demo trains a TopK SAE (k=32, 8 x 576 latents) on the residual stream after block 15 of the
bundled SmolLM2-135M-Instruct, reading the documentation that ships with Python (pydoc), with an
on-disk activation cache so the LM runs over the corpus once. The pydoc corpus is small (about
0.57 M tokens), so the dashboards are computed over all of it; the SAE's metrics come from the
held-out documents. Later runs find the published SAE and start the server in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from sqlalchemy import select

from app.db import current_revision, get_engine, head_revision, session_scope, upgrade
from app.models import SAE, SAEStatus
from app.settings import get_settings

log = logging.getLogger(__name__)

DEMO_NAME = "smollm2-135m-resid15-topk"
DEMO_TRAIN = dict(model="smollm2-135m", site=["resid_post.15"], arch=["topk"], k=[32], width=[4608],
                  tokens=2_000_000, batch_size=4096, corpus="pydoc", eval_fraction=0.1, cache_activations=True)
DEMO_ANALYZE = dict(split="all", tokens=1_000_000)


def demo_ready() -> bool:
    with session_scope() as session:
        sae = session.scalar(select(SAE).where(SAE.name == DEMO_NAME))
        return sae is not None and sae.status == SAEStatus.ready.value


def _step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_demo(rebuild: bool = False, tokens: int | None = None) -> None:
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.lm import load_lm
    from trainer.publish import publish
    from trainer.train import TrainConfig, train

    settings = get_settings()
    engine = get_engine()
    if current_revision(engine) != head_revision():
        _step("creating the store (sae-atlas db upgrade)")
        upgrade(engine)
    if demo_ready() and not rebuild:
        print(f"The demo atlas is ready ({DEMO_NAME}).", flush=True)
        ensure_demo_key()
        return
    started = time.time()
    out = settings.data_dir / "demo" / DEMO_NAME
    _step("loading SmolLM2-135M-Instruct (the first run converts the bundled GGUF, ~20 s)")
    lm = load_lm("smollm2-135m")
    done = (out / "metrics.json").is_file() and (out / "cfg.json").is_file()
    if rebuild or not done:
        _step("training a TopK SAE on resid_post.15 over the Python documentation")
        cfg = TrainConfig(out=out, overwrite=out.exists(), **{**DEMO_TRAIN, **({"tokens": tokens} if tokens else {})})
        train(cfg, lm=lm)
    _step("computing every latent's dashboard in one pass of the LM")
    analyze(AnalyzeConfig(sae_dir=out, restart=rebuild, **DEMO_ANALYZE), lm=lm)
    _step("publishing into the store")
    publish(out, DEMO_NAME, replace=True, description="Demo: SmolLM2-135M-Instruct, Python documentation corpus")
    queue_demo_explanations()
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"\nDemo atlas built in {time.time() - started:.0f} s: FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, "
          f"CE recovered {metrics.get('ce_recovered', float('nan')):.1%}.", flush=True)
    ensure_demo_key()


def ensure_demo_key() -> None:
    """A local API key for the demo's 'request an explanation' button, kept in DATA_DIR (mode 600)."""
    from app.security import create_key

    path: Path = get_settings().data_dir / "demo-api-key.txt"
    if path.is_file():
        print(f"Demo API key (for 'Request an explanation'): {path.read_text().strip()}", flush=True)
        return
    with session_scope() as session:
        from app.models import APIKey

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
    from app.models import Feature

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
