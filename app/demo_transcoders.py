"""The demo's transcoder stage: a transcoder for every block of the bundled LM, and three example graphs.

    one LM pass streams mlp_in.L / mlp_out.L of all 30 blocks  ->  30 TopK transcoders (trainer.train)
    ->  the set published and registered as DEMO_SET (trainer.transcoders.publish_transcoder_set:
        one more LM pass fills one cache of every block's input for the dashboards)
    ->  one attribution graph per example prompt (app.graphs.compute_and_store), each given a
        caption, pinned nodes and supernodes computed from the graph itself (annotate)

The transcoders train streaming from the LM rather than from the demo's activation cache: the
cache would hold 60 sites x 576 floats per token (138 KB in float32, 41 GB for 300k tokens),
and `train --site 'mlp.*'` refuses --cache-activations for that reason. Every step is
resumable: a finished set (its manifest) is not trained again, an interrupted training resumes
from its checkpoint, blocks already published are skipped, and a prompt whose graph is stored is
not attributed again (its annotation is recomputed, which is cheap).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from store.db import get_engine, session_scope
from store.models import AttributionGraph, JobStatus
from store.settings import get_settings

log = logging.getLogger(__name__)

DEMO_SET = "smollm2-135m-transcoders"
"""The registered name of the demo's transcoder set (its blocks are published as DEMO_SET-L{layer})."""


@dataclass(frozen=True)
class DemoPrompt:
    """One example graph of the demo."""

    kind: str
    """What it exemplifies (shown first in the caption)."""
    prompt: str
    """The attributed text; the graph explains the LM's next-token prediction after it."""
    guide: str
    """What a reader should look for, stated as a question the graph answers (not as a finding)."""


DEMO_PROMPTS = (
    DemoPrompt("A Python completion", "for i in range(len(items)):\n    print(items[",
               "Which features, at which tokens, carry the loop variable and the indexing context into the "
               "prediction of the index?"),
    DemoPrompt("A closing bracket", "x = sum(abs(v) for v in values",
               "Which features, at the open bracket of sum( earlier in the line or on the generator's last "
               "words, reach the prediction of the bracket that closes it?"),
    DemoPrompt("A word in prose", "Return a new list containing all items from the iterable in ascending",
               "Which features on the preceding words (a docstring of sorted()) predict the next word?"),
)


@dataclass
class DemoTranscoders:
    """How the demo trains, publishes and shows its transcoder set. BENCHMARKS.md ('The demo's
    transcoder set and example graphs') has what these give and how they were chosen (the time
    budget, and a small sweep of skip term and k on three blocks)."""

    model: str = "smollm2-135m"
    """The LM whose every block gets a transcoder."""
    width: int = 2304
    """Latents per transcoder."""
    k: int = 32
    """Active latents per token (TopK). 32: with the skip term, k 64 gave the same held-out FVU at a
    higher L0 (BENCHMARKS.md, on blocks 4, 15 and 26 of another split)."""
    skip_connection: bool = True
    """A learned linear skip term W_skip x beside the sparse code (a skip-transcoder)."""
    tokens: int = 1_048_576
    """Training tokens, streamed from the LM once for all blocks. Of the levers tried on three blocks
    (batch size, learning rate, width, k, a solved skip term) only more optimiser steps moved FVU
    much, ~0.05 per doubling (BENCHMARKS.md, 'What buys a transcoder FVU'). On the 30 blocks:
    65,536 tokens gave mean FVU 0.366, CE recovered 0.938 and graph replacement 0.29-0.39;
    524,288 gave 0.212, 0.983 and 0.49-0.50; 1,048,576 give 0.191, 0.987 and 0.53-0.54 (completeness
    0.87-0.89), the first budget to meet issue 20's goals. That costs ~40 min of training on the 2-core
    EPYC with two threads, which is why the stage is opt-in."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    shuffle_buffer_mb: int = 1024
    """Memory for the training stream's shuffle window (60 sites x 576 floats a token: ~3,900 tokens)."""
    corpus: str = "pydoc"
    """Training corpus (the demo's)."""
    eval_fraction: float = 0.1
    """Documents held out for the metrics (the demo's split)."""
    eval_tokens: int = 16_384
    """Held-out tokens for each block's FVU, L0 and dead fraction."""
    ce_contexts: int = 32
    """Held-out contexts (of 128 tokens) for the whole set's spliced-in CE, with its 95% interval (each
    block alone is not spliced: that would cost an LM pass per block)."""
    analysis_tokens: int = 16_384
    """Tokens each block's dashboards read (one LM pass for all blocks)."""
    light: bool = True
    """Publish lightly: every latent's dashboard and token-pattern explanation, a sample's embedding score."""
    max_feature_nodes: int = 4096
    """Feature nodes an example graph keeps, chosen by influence (AttributionConfig.max_feature_nodes)."""
    pins: int = 6
    """Feature nodes pinned on each example graph (the strongest direct contributors to the top logit)."""
    prompts: tuple[DemoPrompt, ...] = field(default=DEMO_PROMPTS)
    """The example graphs."""
    train_overrides: dict = field(default_factory=dict)
    """Further TrainConfig fields (ctx_len, device, ...; the tests' tiny model sets some)."""
    analysis_overrides: dict = field(default_factory=dict)
    """AnalyzeConfig fields every block's analysis overrides (publish_transcoder_set's `analysis`)."""

    def train_config(self, out: Path):
        from trainer.train import TrainConfig

        return TrainConfig(out=out, model=self.model, site=["mlp.*"], arch=["topk"], width=[self.width], k=[self.k],
                           skip_connection=self.skip_connection, tokens=self.tokens, batch_size=self.batch_size,
                           corpus=self.corpus, eval_fraction=self.eval_fraction, eval_tokens=self.eval_tokens,
                           ce_contexts=self.ce_contexts, ce_each=False,
                           checkpoint_every=0, checkpoint_every_s=300.0, shuffle_buffer_mb=self.shuffle_buffer_mb, **self.train_overrides)

    def graph_config(self) -> dict:
        from trainer.circuits.compute import GraphConfig

        cfg = GraphConfig()
        cfg.attribution.max_feature_nodes = self.max_feature_nodes
        return cfg.to_dict()


def set_folder() -> Path:
    """Where the demo trains its transcoder set."""
    return get_settings().data_dir / "demo" / "transcoders"


def registered_manifest() -> Path:
    from trainer.transcoders.sets import SET_FILE, sets_dir

    return sets_dir() / DEMO_SET / SET_FILE


def stored_graphs(settings: DemoTranscoders | None = None) -> dict[str, str]:
    """prompt -> slug of the newest finished demo graph of that prompt through DEMO_SET."""
    settings = settings or DemoTranscoders()
    prompts = [p.prompt for p in settings.prompts]
    with session_scope() as session:
        rows = session.execute(select(AttributionGraph.prompt, AttributionGraph.slug)
                               .where(AttributionGraph.set_name == DEMO_SET, AttributionGraph.prompt.in_(prompts),
                                      AttributionGraph.status == JobStatus.done.value)
                               .order_by(AttributionGraph.id)).all()
    return {prompt: slug for prompt, slug in rows}


def transcoders_ready(settings: DemoTranscoders | None = None) -> bool:
    """The set is registered and every example graph is stored."""
    settings = settings or DemoTranscoders()
    return registered_manifest().is_file() and len(stored_graphs(settings)) == len(settings.prompts)


def _step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_transcoders(lm=None, settings: DemoTranscoders | None = None, rebuild: bool = False,
                      timings: dict | None = None) -> dict[str, str]:
    """Train, publish and register the demo's transcoder set and store its example graphs, doing
    only what is missing (all of it with rebuild). Returns prompt -> graph slug. timings, when
    given, gets the seconds of each stage."""
    from trainer.checkpoint import CHECKPOINT
    from trainer.train import train
    from trainer.transcoders.publish_set import publish_transcoder_set
    from trainer.transcoders.sets import SET_FILE

    settings = settings or DemoTranscoders()
    times = timings if timings is not None else {}
    out = set_folder()
    manifest = out / SET_FILE
    if rebuild or not manifest.is_file():
        cfg = settings.train_config(out)
        if not rebuild and (out / CHECKPOINT).exists():
            cfg = dataclasses.replace(cfg, resume=True)
        else:
            cfg = dataclasses.replace(cfg, overwrite=out.exists())
        _step(f"training a transcoder for every block of {settings.model} ({settings.width:,} latents, k {settings.k}"
              f"{', skip term' if settings.skip_connection else ''}) from one LM pass of {settings.tokens:,} tokens")
        started = time.perf_counter()
        train(cfg, lm=lm)
        times["train_s"] = time.perf_counter() - started
    _step(f"publishing the transcoder set as {DEMO_SET} (dashboards of every block from one LM pass)")
    started = time.perf_counter()
    parts: dict = {}
    publish_transcoder_set(manifest, DEMO_SET, lm=lm, tokens=settings.analysis_tokens, light=settings.light,
                           replace=rebuild, progress=True, analysis=settings.analysis_overrides, timings=parts)
    times["publish_s"] = time.perf_counter() - started
    times.update({f"publish.{k}": v for k, v in parts.items()})
    done = {} if rebuild else stored_graphs(settings)
    engine = get_engine()
    slugs = {}
    for example in settings.prompts:
        slug = done.get(example.prompt)
        if slug is None:
            from app.graphs import compute_and_store

            _step(f"attribution graph: {example.kind.lower()} ({example.prompt!r})")
            started = time.perf_counter()
            row = compute_and_store(engine, registered_manifest(), example.prompt, settings.graph_config())
            times[f"graph_s.{example.kind}"] = time.perf_counter() - started
            slug = row.slug
        annotate(slug, example, settings.pins)
        slugs[example.prompt] = slug
    return slugs


def annotate(slug: str, example: DemoPrompt, pins: int) -> dict:
    """Give a stored graph its caption, pinned nodes and supernodes, all computed from the graph:
    the pins are the target logit and the `pins` feature nodes with the strongest direct edges into
    it, labelled with their published blocks' explanations; the supernodes group the pinned
    features by the prompt token they sit on. Returns what was stored."""
    from store import graphs as gstore

    with session_scope() as session:
        row = gstore.get_graph(session, slug)
        data = gstore.unpack(row.graph)
        nodes = {n["node_id"]: n for n in data["nodes"]}
        target = next(n for n in data["nodes"] if n.get("is_target_logit"))
        direct = sorted(((link["weight"], link["source"]) for link in data["links"]
                         if link["target"] == target["node_id"]
                         and nodes.get(link["source"], {}).get("feature_type") == "cross layer transcoder"),
                        key=lambda t: -abs(t[0]))[:pins]
        explained = _explanations(session, row, [nodes[s] for _, s in direct])
        tokens = data["metadata"].get("prompt_tokens", [])
        parts = []
        for weight, source in direct:
            n = nodes[source]
            layer, index, _ = map(int, source.split("_"))
            at = tokens[n["ctx_idx"]] if n["ctx_idx"] < len(tokens) else "?"
            what = explained.get((layer, index))
            parts.append(f"L{layer} #{index} at {at!r} ({weight:+.2f}" + (f"; “{what}”)" if what else ")"))
        by_token: dict[int, list[str]] = {}
        for _, source in direct:
            by_token.setdefault(nodes[source]["ctx_idx"], []).append(source)
        supernodes = [[f"features at {tokens[pos]!r}" if pos < len(tokens) else f"position {pos}", *ids]
                      for pos, ids in sorted(by_token.items()) if len(ids) > 1]
        n_features = sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
        caption = (f"{example.kind}. {example.guide} The model's top prediction is {target['clerp'].removeprefix('Output ')}. "
                   f"Unpruned, the transcoders' features and the error nodes explain it with replacement score "
                   f"{row.replacement_score:.2f} and completeness {row.completeness_score:.2f}; the stored graph keeps "
                   f"{n_features} feature nodes. Pinned: the prediction and the {len(direct)} feature nodes with the "
                   f"strongest direct edges into it (block, latent, token, edge weight, the latent's explanation): "
                   + "; ".join(parts) + "."
                   + (" Supernodes group the pinned features that sit on the same token." if supernodes else ""))
        data["metadata"]["caption"] = caption
        data["qParams"]["pinnedIds"] = [target["node_id"], *(s for _, s in direct)]
        data["qParams"]["supernodes"] = supernodes
        gstore.set_graph_data(session, row.id, data)
    return {"caption": caption, "pinned": data["qParams"]["pinnedIds"], "supernodes": supernodes}


def _explanations(session, row, feature_nodes: list[dict]) -> dict[tuple[int, int], str]:
    """(layer, latent) -> the published explanation of each feature node's latent, where one exists."""
    from app.web.graph_pages import layer_saes
    from store.models import SAE, Feature

    names = layer_saes(session, row)
    out = {}
    for n in feature_nodes:
        layer, index, _ = map(int, n["node_id"].split("_"))
        if layer not in names:
            continue
        text = session.scalar(select(Feature.explanation).join(SAE, Feature.sae_id == SAE.id)
                              .where(SAE.name == names[layer], Feature.index == index))
        if text:
            out[(layer, index)] = " ".join(text.split())[:120]
    return out


def demo_graph_summary(slugs: dict[str, str]) -> str:
    """One line per example graph: its page and scores."""
    with session_scope() as session:
        rows = session.execute(select(AttributionGraph.slug, AttributionGraph.prompt, AttributionGraph.replacement_score,
                                      AttributionGraph.completeness_score, AttributionGraph.seconds)
                               .where(AttributionGraph.slug.in_(list(slugs.values())))).all()
    return "\n".join(f"  /graphs/{slug}  replacement {r:.2f}, completeness {c:.2f}, {s:.0f} s  {json.dumps(p)}"
                     for slug, p, r, c, s in rows)
