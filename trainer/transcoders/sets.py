"""A transcoder set: one model's per-block MLP transcoders, grouped by a manifest.

A multi-block run (`train --site 'mlp.*'`) writes, next to its per-block folders (each a normal
SAE folder that analyze, publish and import read), `transcoder_set.json`:

    {"format": 1, "kind": "transcoder_set", "model": ..., "n_layers": 30,
     "architecture": "topk", "d_sae": 4608, "k": 32, "skip_connection": false,
     "layers": [{"layer": 0, "folder": "mlp.0-topk-w4608-k32", "input_site": "mlp_in.0",
                 "output_site": "mlp_out.0", "architecture": "topk", "metrics": {...}}, ...],
     "metrics": {...}}            # the whole set spliced in at once (trainer.evaluate.spliced_set_loss)

A sweep (several architectures, widths or k) makes one set per configuration,
`transcoder_set.<configuration>.json`. Code that needs every block (attribution graphs, a
replacement model) loads a set with load_transcoder_set(path), which refuses a set missing a block.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.errors import AtlasError
from trainer.sources import transcoder_sites

SET_FILE = "transcoder_set.json"
SET_FORMAT = 1
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""What a registered set's name may be: a folder or file name in DATA_DIR/transcoder_sets, no path."""


def sets_dir() -> Path:
    """DATA_DIR/transcoder_sets: the registered sets, by name (what graphs are computed through)."""
    from store.settings import get_settings

    return get_settings().data_dir / "transcoder_sets"


@dataclass
class SetLayer:
    """One block's transcoder in a set."""

    layer: int
    """The block whose MLP it replaces."""
    folder: str
    """Its SAE folder, relative to the manifest's folder."""
    input_site: str
    """What it reads (mlp_in.L)."""
    output_site: str
    """What it predicts (mlp_out.L)."""
    architecture: str
    """topk, batchtopk, jumprelu, relu or matryoshka."""
    metrics: dict = field(default_factory=dict)
    """Its held-out metrics (FVU against the output site, L0, dead fraction, CE spliced in alone)."""


@dataclass
class TranscoderSet:
    """A manifest read from disk (see the module docstring)."""

    path: Path
    """The manifest file."""
    model: str
    """The LM the transcoders were trained on."""
    n_layers: int
    """The LM's number of blocks."""
    architecture: str
    """Architecture shared by the set."""
    d_sae: int
    """Latents per transcoder."""
    k: int | None
    """Active latents (TopK family) or target L0 (JumpReLU); None for ReLU."""
    skip_connection: bool
    """Whether every transcoder has a W_skip term."""
    layers: dict[int, SetLayer]
    """Block -> its transcoder."""
    metrics: dict = field(default_factory=dict)
    """The whole set spliced in at once: CE recovered and delta LM loss with 95% intervals."""

    def missing(self) -> list[int]:
        return [L for L in range(self.n_layers) if L not in self.layers]

    def check_complete(self) -> None:
        """AtlasError unless every block of the model has its transcoder."""
        missing = self.missing()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
            raise AtlasError(f"transcoder set {self.path} lacks block(s) {shown} of {self.model}'s {self.n_layers}",
                             "train the missing blocks (--site mlp.L) or use a complete set")

    def folder(self, layer: int) -> Path:
        return self.path.parent / self.layers[layer].folder

    def load(self, layer: int):
        """The LoadedSAE of one block, checked to be the transcoder the manifest says."""
        from trainer.formats import load_sae

        entry = self.layers[layer]
        folder = self.folder(layer)
        if not folder.is_dir():
            raise AtlasError(f"transcoder set {self.path}: block {layer}'s folder {folder} is missing",
                             "restore the folder or train the block again")
        loaded = load_sae(folder)
        if not loaded.transcoder or (loaded.site, loaded.output_site) != (entry.input_site, entry.output_site):
            raise AtlasError(f"transcoder set {self.path}: {folder} is not a transcoder from {entry.input_site} to "
                             f"{entry.output_site}", "the manifest and the folders disagree; train the set again")
        return loaded

    def load_all(self) -> dict:
        """Every block's LoadedSAE, block -> LoadedSAE; refuses an incomplete set."""
        self.check_complete()
        return {layer: self.load(layer) for layer in sorted(self.layers)}


def set_tag(architecture: str, d_sae: int, k: int | None) -> str:
    return f"{architecture}-w{d_sae}" + (f"-k{k}" if k is not None else "")


def set_groups(entries: list[tuple[int, str, object]]) -> dict[str, list[tuple[int, str, object]]]:
    """Group (layer, folder, SAEConfig) of a run's transcoders by configuration: each group is a set."""
    from trainer.config import USES_K

    groups: dict[str, list] = {}
    for layer, folder, cfg in entries:
        tag = set_tag(cfg.architecture, cfg.d_sae, cfg.k if cfg.architecture in USES_K else None)
        groups.setdefault(tag, []).append((layer, folder, cfg))
    return groups


def write_transcoder_set(root: Path, tag: str, only_set: bool, model: str, n_layers: int, architecture: str,
                         d_sae: int, k: int | None, skip_connection: bool, layers: list[SetLayer],
                         metrics: dict | None = None) -> Path:
    """Write a manifest into `root` (atomically): SET_FILE when it is the run's only set, else
    transcoder_set.<tag>.json. Returns its path."""
    path = root / (SET_FILE if only_set else f"transcoder_set.{tag}.json")
    data = {"format": SET_FORMAT, "kind": "transcoder_set", "model": model, "n_layers": int(n_layers),
            "architecture": architecture, "d_sae": int(d_sae), "k": k, "skip_connection": bool(skip_connection),
            "layers": [asdict(e) for e in sorted(layers, key=lambda e: e.layer)], "metrics": metrics or {}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def load_transcoder_set(path: str | Path, complete: bool = True) -> TranscoderSet:
    """Read a set's manifest: the file itself, or a run folder holding exactly one. With `complete`
    (the default) a set that lacks a block of the model is refused."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("transcoder_set*.json"))
        if not found:
            raise AtlasError(f"{path} holds no transcoder set ({SET_FILE})", "train one with --site 'mlp.*'")
        if len(found) > 1:
            raise AtlasError(f"{path} holds {len(found)} transcoder sets", f"pass one of {', '.join(f.name for f in found)}")
        path = found[0]
    if not path.is_file():
        raise AtlasError(f"transcoder set {path} does not exist", "point at a run folder or its transcoder_set.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AtlasError(f"transcoder set {path} is not valid JSON ({exc})", "train the set again") from None
    if not isinstance(data, dict) or data.get("kind") != "transcoder_set" or data.get("format") != SET_FORMAT:
        raise AtlasError(f"{path} is not a transcoder set manifest (format {SET_FORMAT})", "train the set again")
    try:
        n_layers = int(data["n_layers"])
        layers: dict[int, SetLayer] = {}
        for e in data["layers"]:
            entry = SetLayer(**e)
            if (entry.input_site, entry.output_site) != transcoder_sites(entry.layer) or not 0 <= entry.layer < n_layers:
                raise ValueError(f"block {entry.layer} has sites {entry.input_site} -> {entry.output_site}")
            if entry.layer in layers:
                raise ValueError(f"block {entry.layer} is listed twice")
            layers[entry.layer] = entry
        tset = TranscoderSet(path, str(data["model"]), n_layers, str(data["architecture"]), int(data["d_sae"]),
                             data.get("k"), bool(data.get("skip_connection", False)), layers, data.get("metrics") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise AtlasError(f"transcoder set {path} is malformed: {exc}", "train the set again") from None
    if complete:
        tset.check_complete()
    return tset
