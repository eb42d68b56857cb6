"""Publish a transcoder set as a unit: every block analysed and published, the set registered.

    publish_transcoder_set(run folder or transcoder_set*.json, prefix)
      -> the set loaded whole (load_transcoder_set: a set missing a block is refused) and every
         block checked to be the transcoder the manifest says
      -> ONE LM pass fills one activation cache holding every unpublished block's input site
         mlp_in.L (trainer.activations.ActivationCache with all the sites)
      -> each block's analysis (trainer.analyze) reads its mlp_in.L from that cache: its examples
         are read where the transcoder reads, its logit effects go through its decoder, which
         writes mlp_out.L; then the cache (n_blocks x d_model values per token) is deleted
      -> each block published (trainer.publish) as `{prefix}-L{layer}`, its config recording the
         set ({"transcoder_set": {"name", "layer", "n_layers", "manifest"}})
      -> the set registered as DATA_DIR/transcoder_sets/<name>/transcoder_set.json: the manifest
         with absolute block folders and the published name of each block, so that
         `sae-atlas graph --set NAME`, POST /api/v1/graphs and the graph pages find it and link
         every feature node to its block's published SAE (store.graphs.published_layers).

Re-running skips the blocks already published from the set's folders (unless replace) and the
analyses already finished, so an interrupted publish resumes. `light` keeps every latent's
dashboard and token-pattern explanation but computes the embedding AUROC of a sample of
LIGHT_SCORE_SAMPLE latents per block (the rest are stored as not computed) and does not relate
the blocks to other published SAEs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

from store.errors import AtlasError

log = logging.getLogger(__name__)

LIGHT_SCORE_SAMPLE = 64
"""Latents per block whose embedding AUROC a light publish computes."""
DEFAULT_TOKENS = 100_000
"""Tokens each block's analysis reads (all blocks read the same tokens from one LM pass)."""


def block_name(prefix: str, layer: int) -> str:
    """The published name of a set's block."""
    return f"{prefix}-L{layer}"


def registered_dir(name: str) -> Path:
    from trainer.transcoders.sets import sets_dir

    return sets_dir() / name


def publish_transcoder_set(manifest_path: str | Path, prefix: str, *, lm=None, tokens: int = DEFAULT_TOKENS,
                           light: bool = False, replace: bool = False, name: str | None = None, engine=None,
                           progress: bool = True, analysis: dict | None = None, explain: bool | None = None,
                           keep_cache: bool = False, timings: dict | None = None) -> list[str]:
    """Analyse, publish and register a transcoder set; returns the published names, block by block.

    manifest_path: a run folder holding one transcoder_set*.json, or the manifest itself.
    prefix: block L is published as `{prefix}-L{L}`. lm: the set's LM, already loaded (else loaded
    here). tokens: tokens each block's analysis reads (one LM pass for all blocks). light: sample
    the embedding score (see the module docstring). replace: publish again blocks already
    published, and re-register the set. name: the registered set's name (default: prefix).
    analysis: AnalyzeConfig fields to override for every block (corpus, ctx_len, device, ...).
    explain: write token-pattern explanations (None: the publish_explanations setting).
    keep_cache: keep the activation cache this call filled (n_blocks x d_model values per token, in
    the LM's dtype) under DATA_DIR/activations; by default it is deleted once every block is analysed.
    timings: if given, filled with the seconds of each stage (lm_pass_s, analyses_s, publish_s).
    """
    plan = plan_set_publish(manifest_path, prefix, name=name, replace=replace, engine=engine)
    times = timings if timings is not None else {}
    times.update(lm_pass_s=0.0, analyses_s=0.0, publish_s=0.0)
    if plan.todo:
        lm = analyze_blocks(plan.tset, plan.todo, loaded=plan.loaded, lm=lm, tokens=tokens, analysis=analysis,
                            progress=progress, keep_cache=keep_cache, timings=times)
        started = time.perf_counter()
        _publish_blocks(plan, lm, light, replace, progress, explain)
        times["publish_s"] = time.perf_counter() - started
    register_set(plan.tset, plan.name, plan.names, replace=replace)
    return [plan.names[layer] for layer in sorted(plan.names)]


@dataclass
class SetPublish:
    """What publishing one set involves, checked before anything is analysed or written."""

    tset: object
    """The TranscoderSet (complete, every block the transcoder its manifest says)."""
    name: str
    """The name the set is registered under."""
    names: dict[int, str]
    """Block -> its published name."""
    todo: list[int]
    """The blocks still to publish (the others are published from the set's own folders)."""
    loaded: dict
    """Block -> its LoadedSAE."""
    engine: object
    """The store's engine."""

    def items(self) -> tuple[list[tuple[Path, str]], list[dict]]:
        """(folder, published name) of every block to publish and, for trainer.publish.publish_many's
        per_item, each block's description and the config keys recording its set."""
        tset, items, per_item = self.tset, [], []
        for layer in self.todo:
            entry = tset.layers[layer]
            description = (f"Block {layer} of the transcoder set {self.name} ({tset.n_layers} blocks of {tset.model}): a "
                           f"transcoder from {entry.input_site} to {entry.output_site}. Examples are read at "
                           f"{entry.input_site}; logit effects go through the decoder, which writes {entry.output_site}.")
            extra = {"transcoder_set": {"name": self.name, "layer": layer, "n_layers": tset.n_layers,
                                        "input_site": entry.input_site, "output_site": entry.output_site,
                                        "manifest": str(tset.path.resolve())}}
            items.append((tset.folder(layer), self.names[layer]))
            per_item.append({"description": description, "extra_config": extra})
        return items, per_item


def plan_set_publish(manifest_path: str | Path, prefix: str, name: str | None = None, replace: bool = False,
                     engine=None) -> SetPublish:
    """Load a set and check it can be published under `prefix` and registered as `name` (default:
    prefix): every block loads as the transcoder the manifest says, no name is taken by another
    set or SAE (unless replace). AtlasError otherwise."""
    from store.publish import check_name
    from trainer.transcoders.sets import load_transcoder_set

    name = name or prefix
    _check_set_name(name)
    tset = load_transcoder_set(manifest_path)
    names = {layer: block_name(prefix, layer) for layer in sorted(tset.layers)}
    for n in names.values():
        check_name(n)
    check_registration(tset, name, replace)
    folders = {layer: tset.folder(layer).resolve() for layer in names}
    loaded = {layer: tset.load(layer) for layer in names}  # every block is the transcoder the manifest says
    engine = _engine(engine)
    done = _already_published(engine, names, folders, replace)
    todo = [layer for layer in names if layer not in done]
    log.info("transcoder set %s: %d blocks, %d already published", tset.path, len(names), len(done))
    return SetPublish(tset, name, names, todo, loaded, engine)


def analyze_blocks(tset, layers: list[int], *, loaded: dict | None = None, lm=None, tokens: int = DEFAULT_TOKENS,
                   analysis: dict | None = None, progress: bool = True, keep_cache: bool = False,
                   timings: dict | None = None, progress_items: tuple[int, int] | None = None):
    """Analyse these blocks of a set: one LM pass caches every block's input site, then each
    block's analysis reads it (see the module docstring); returns the LM. An analysis already
    finished is kept. progress_items: (first, total) to number the stages (the LM pass, then each
    block) as items for trainer.progress, whose reports a trainer worker turns into a run's progress."""
    if tokens <= 0:
        raise AtlasError(f"tokens must be positive, not {tokens}")
    loaded = loaded or {layer: tset.load(layer) for layer in layers}
    times = timings if timings is not None else {}

    def item(i: int) -> None:
        if progress_items is not None:
            os.environ["SAE_ATLAS_PROGRESS_ITEM"] = f"{progress_items[0] + i}/{progress_items[1]}"

    analyzers, lm = _analyzers(tset, layers, loaded, lm, tokens, analysis or {})
    started = time.perf_counter()
    item(0)
    filled = _fill_shared_cache([a for a in analyzers.values() if not a.complete()], lm, tokens,
                                report=progress_items is not None)
    times["lm_pass_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for i, layer in enumerate(layers):
        item(i + 1)
        analyzers[layer].run(progress)
    times["analyses_s"] = time.perf_counter() - started
    if not keep_cache:
        for cache in filled:  # every block's analysis is done: its codes are in its own folder now
            shutil.rmtree(cache.dir, ignore_errors=True)
    return lm


def _check_set_name(name: str) -> None:
    from trainer.transcoders.sets import SET_NAME

    if not SET_NAME.fullmatch(name or ""):
        raise AtlasError(f"invalid transcoder set name {name!r}",
                         "use letters, digits, '.', '_' or '-', starting with a letter or digit")


def _engine(engine):
    from store.db import check_schema, get_engine

    engine = engine or get_engine()
    check_schema(engine)
    return engine


def _already_published(engine, names: dict[int, str], folders: dict[int, Path], replace: bool) -> set[int]:
    """The blocks published under their name from the set's own folder (skipped unless replace);
    a name taken by an SAE from another folder is refused unless replace."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.models import SAE, SAEStatus

    with Session(engine) as session:
        rows = session.execute(select(SAE.name, SAE.weights_path, SAE.status)
                               .where(SAE.name.in_(list(names.values())))).all()
    by_name = {n: (w, st) for n, w, st in rows}
    done: set[int] = set()
    for layer, n in names.items():
        if n not in by_name or replace:
            continue
        weights, status = by_name[n]
        if status == SAEStatus.ready.value and str(weights or "").rstrip("/") == str(folders[layer]):
            done.add(layer)
        else:
            raise AtlasError(f"an SAE named {n!r} is already published from {weights}, not from block {layer}'s "
                             f"folder {folders[layer]}", "pass --replace to replace it, or choose another --prefix")
    return done


def _analyzers(tset, todo: list[int], loaded: dict, lm, tokens: int, overrides: dict):
    """One Analyzer per block to analyse, all reading the activation cache, sharing one LM."""
    from trainer.analyze import AnalyzeConfig, Analyzer, resolve_defaults
    from trainer.lm import load_lm, pick_device

    bad = set(overrides) & {"sae_dir", "site", "out", "tokens", "cache_activations", "model"}
    if bad:
        raise AtlasError(f"a transcoder set's analysis cannot override {', '.join(sorted(bad))}")
    base = AnalyzeConfig(sae_dir=Path("."), tokens=tokens, cache_activations=True, **overrides)
    if lm is None:
        first = resolve_defaults(dc_replace(base, sae_dir=tset.folder(todo[0])), loaded[todo[0]])
        lm = load_lm(first.model, pick_device(first.device), first.lm_dtype)
    out = {}
    for layer in todo:
        cfg = dc_replace(base, sae_dir=tset.folder(layer), model=tset.model)
        out[layer] = Analyzer(cfg, lm=lm, loaded=loaded[layer])
    return out, lm


def _fill_shared_cache(analyzers: list, lm, tokens: int, report: bool = False) -> list:
    """Fill one activation cache with every analyser's input site in one LM pass (unless a cache
    with all of them already covers the tokens) and return the caches filled here. The analyses
    then find it: a cache of more sites serves each of them (trainer.activations.find_cache).
    report: also report the pass's progress to trainer.progress (phase analyze)."""
    from store.settings import get_settings
    from trainer.activations import ActivationCache, find_cache

    if not analyzers:
        return []
    specs = {}
    for a in analyzers:
        spec = a.source.stream_spec(a.cfg.split)
        key = json.dumps({k: v for k, v in spec.__dict__.items() if k != "sites"}, sort_keys=True, default=str)
        specs.setdefault(key, [spec, []])[1].extend(spec.sites)
    root = get_settings().data_dir / "activations"
    filled = []
    for spec, sites in specs.values():
        spec = dc_replace(spec, sites=sorted(set(sites), key=lambda s: int(s.split(".")[1])))
        found = find_cache(root, spec)
        if found is not None and found.covers(tokens):
            continue
        # a shard's activations of every site wait in memory: as many tokens per shard in all as one site's
        filled.append(ActivationCache(root, spec).fill(lm, tokens, analyzers[0].cfg.lm_batch_size,
                                                       desc=f"reading {len(spec.sites)} input sites",
                                                       shard_tokens=max(4096, (1 << 18) // len(spec.sites)),
                                                       report_phase="analyze" if report else None))
    return filled


def _publish_blocks(plan: SetPublish, lm, light: bool, replace: bool, progress: bool, explain: bool | None) -> None:
    """Publish the set's blocks one by one (a block's dashboards are in memory only while it is written)."""
    from trainer.publish import publish

    items, per_item = plan.items()
    for (folder, published), options in zip(items, per_item):
        publish(folder, published, replace=replace, engine=plan.engine, progress=progress, lm=lm, explain=explain,
                score_sample=LIGHT_SCORE_SAMPLE if light else None, relate=False if light else None, **options)
        log.info("published %s of %s", published, plan.name)


def register_set(tset, name: str, names: dict[int, str], replace: bool = False) -> Path:
    """Write DATA_DIR/transcoder_sets/<name>/transcoder_set.json: the set's manifest with absolute
    block folders and, per block, its published name. A name already registered for another set is
    refused unless replace."""
    from dataclasses import asdict

    from trainer.transcoders.sets import SET_FORMAT

    path = check_registration(tset, name, replace)
    if path.resolve() == tset.path.resolve():
        return path  # the set's own run folder is already in DATA_DIR/transcoder_sets under this name
    folder, source = path.parent, str(tset.path.resolve())
    layers = [{**asdict(e), "folder": str(tset.folder(e.layer).resolve())} for _, e in sorted(tset.layers.items())]
    data = {"format": SET_FORMAT, "kind": "transcoder_set", "model": tset.model, "n_layers": tset.n_layers,
            "architecture": tset.architecture, "d_sae": tset.d_sae, "k": tset.k,
            "skip_connection": tset.skip_connection, "layers": layers, "metrics": tset.metrics,
            "source": source, "published": {str(layer): n for layer, n in sorted(names.items())}}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    log.info("registered transcoder set %s in %s", name, folder)
    return path


def check_registration(tset, name: str, replace: bool) -> Path:
    """Where the set named `name` is registered (DATA_DIR/transcoder_sets/<name>/transcoder_set.json),
    after checking it may be: refused when the name is registered for another set (unless
    replace) or is another set's own run folder."""
    from trainer.transcoders.sets import SET_FILE

    folder = registered_dir(name)
    path = folder / SET_FILE
    if path.is_file() and path.resolve() == tset.path.resolve():
        return path
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if "source" not in old:  # a run folder put there by hand: its manifest is the set's only copy
            raise AtlasError(f"{folder} holds another transcoder set's own run folder", "choose another --name")
        if old["source"] != str(tset.path.resolve()) and not replace:
            raise AtlasError(f"a transcoder set named {name!r} is already registered (from {old['source']})",
                             "pass --replace to register this one instead, or choose another --name")
    others = [p.name for p in folder.glob("transcoder_set*.json") if p.name != SET_FILE] if folder.is_dir() else []
    if others:
        raise AtlasError(f"{folder} holds other transcoder sets ({', '.join(others)})", "choose another --name")
    return path
