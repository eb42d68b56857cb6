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
    from store.publish import check_name
    from trainer.transcoders.sets import load_transcoder_set

    name = name or prefix
    _check_set_name(name)
    tset = load_transcoder_set(manifest_path)
    names = {layer: block_name(prefix, layer) for layer in sorted(tset.layers)}
    for n in names.values():
        check_name(n)
    if tokens <= 0:
        raise AtlasError(f"tokens must be positive, not {tokens}")
    folders = {layer: tset.folder(layer).resolve() for layer in names}
    loaded = {layer: tset.load(layer) for layer in names}  # every block is the transcoder the manifest says
    engine = _engine(engine)
    done = _already_published(engine, names, folders, replace)
    todo = [layer for layer in names if layer not in done]
    log.info("transcoder set %s: %d blocks, %d already published", tset.path, len(names), len(done))
    times = timings if timings is not None else {}
    times.update(lm_pass_s=0.0, analyses_s=0.0, publish_s=0.0)
    if todo:
        analyzers, lm = _analyzers(tset, todo, loaded, lm, tokens, analysis or {})
        started = time.perf_counter()
        filled = _fill_shared_cache([a for a in analyzers.values() if not a.complete()], lm, tokens)
        times["lm_pass_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for layer in todo:
            analyzers[layer].run(progress)
        times["analyses_s"] = time.perf_counter() - started
        if not keep_cache:
            for cache in filled:  # every block's analysis is done: its codes are in its own folder now
                shutil.rmtree(cache.dir, ignore_errors=True)
        started = time.perf_counter()
        _publish_blocks(tset, name, names, todo, lm, light, replace, engine, progress, explain)
        times["publish_s"] = time.perf_counter() - started
    register_set(tset, name, names, replace=replace)
    return [names[layer] for layer in sorted(names)]


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


def _fill_shared_cache(analyzers: list, lm, tokens: int) -> list:
    """Fill one activation cache with every analyser's input site in one LM pass (unless a cache
    with all of them already covers the tokens) and return the caches filled here. The analyses
    then find it: a cache of more sites serves each of them (trainer.activations.find_cache)."""
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
                                                       shard_tokens=max(4096, (1 << 18) // len(spec.sites))))
    return filled


def _publish_blocks(tset, name: str, names: dict[int, str], todo: list[int], lm, light: bool, replace: bool,
                    engine, progress: bool, explain: bool | None) -> None:
    from trainer.publish import publish

    for layer in todo:
        entry = tset.layers[layer]
        description = (f"Block {layer} of the transcoder set {name} ({tset.n_layers} blocks of {tset.model}): a "
                       f"transcoder from {entry.input_site} to {entry.output_site}. Examples are read at "
                       f"{entry.input_site}; logit effects go through the decoder, which writes {entry.output_site}.")
        extra = {"transcoder_set": {"name": name, "layer": layer, "n_layers": tset.n_layers,
                                    "input_site": entry.input_site, "output_site": entry.output_site,
                                    "manifest": str(tset.path.resolve())}}
        publish(tset.folder(layer), names[layer], replace=replace, engine=engine, description=description,
                progress=progress, lm=lm, explain=explain, score_sample=LIGHT_SCORE_SAMPLE if light else None,
                relate=False if light else None, extra_config=extra)
        log.info("published block %d of %s as %s", layer, name, names[layer])


def register_set(tset, name: str, names: dict[int, str], replace: bool = False) -> Path:
    """Write DATA_DIR/transcoder_sets/<name>/transcoder_set.json: the set's manifest with absolute
    block folders and, per block, its published name. A name already registered for another set is
    refused unless replace."""
    from dataclasses import asdict

    from trainer.transcoders.sets import SET_FILE, SET_FORMAT

    folder = registered_dir(name)
    path = folder / SET_FILE
    source = str(tset.path.resolve())
    if path.is_file() and not replace:
        try:
            old = json.loads(path.read_text()).get("source")
        except (OSError, ValueError):
            old = None
        if old != source:
            raise AtlasError(f"a transcoder set named {name!r} is already registered (from {old})",
                             "pass --replace to register this one instead, or choose another --name")
    others = [p.name for p in folder.glob("transcoder_set*.json") if p.name != SET_FILE] if folder.is_dir() else []
    if others:
        raise AtlasError(f"{folder} holds other transcoder sets ({', '.join(others)})", "choose another --name")
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
