"""Interchange formats: save in the SAELens layout; load SAELens, Gemma Scope and EleutherAI sparsify;
export to SAELens or sparsify.

One module per format (saelens.py also holds our own save format, a superset of SAELens's),
common.py for what they share, sites.py for the other tools' names of activation sites.
Nothing is ever unpickled: safetensors, JSON and numpy arrays loaded with allow_pickle=False only.
"""

from __future__ import annotations

from pathlib import Path

from store.errors import AtlasError
from trainer.formats.common import LoadedSAE, SiteIO, read_json
from trainer.formats.gemmascope import load_gemmascope_npz
from trainer.formats.saelens import (
    CFG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    export_tensors,
    load_saelens,
    saelens_architecture,
    save_sae,
)
from trainer.formats.sites import check_native_hook, hook_name_for, site_from_hook
from trainer.formats.sparsify import SPARSIFY_WEIGHTS, load_sparsify, save_sparsify

__all__ = ["CFG_FILE", "FORMAT_VERSION", "SPARSIFY_WEIGHTS", "WEIGHTS_FILE", "LoadedSAE", "SiteIO",
           "check_native_hook", "export_folder", "export_tensors", "hook_name_for", "load_sae",
           "save_sae", "site_from_hook"]


def load_sae(folder: str | Path) -> LoadedSAE:
    """Load an SAE folder in SAELens (incl. ours) or sparsify layout, or a Gemma Scope params.npz."""
    path = Path(folder).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return load_gemmascope_npz(path, {})
    if not path.is_dir():
        raise AtlasError(f"SAE folder {path} does not exist", "point at a folder with cfg.json and the weights")
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        if (path / "params.npz").is_file():
            return load_gemmascope_npz(path / "params.npz", {})
        raise AtlasError(f"{path} has no cfg.json", "an SAE folder needs cfg.json plus sae_weights.safetensors (SAELens) or sae.safetensors (sparsify)")
    cfg = read_json(cfg_path)
    if (path / WEIGHTS_FILE).is_file():
        return load_saelens(path, cfg)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify(path, cfg)
    if (path / "params.npz").is_file():
        return load_gemmascope_npz(path / "params.npz", cfg)
    raise AtlasError(f"weights file {path / WEIGHTS_FILE} is missing", "copy the SAE's weights into the folder")


def export_folder(source: str | Path, fmt: str, out: Path, model: str | None = None) -> Path:
    """Write the SAE in `source` (any format we read) as a `fmt` folder that the tool itself loads:
    saelens (SAE.load_from_disk) or sparsify (SparseCoder.load_from_disk; TopK only)."""
    loaded = load_sae(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AtlasError(f"{out} already exists and is not empty", "choose another --out")
    if fmt == "sparsify":
        save_sparsify(loaded, out)
        return out
    if fmt != "saelens":
        raise AtlasError(f"unknown export format {fmt!r}", "use saelens or sparsify")
    skip = getattr(loaded.sae.io, "W_skip", None) is not None
    if saelens_architecture(loaded.architecture, loaded.transcoder, skip) is None:
        what = "TopK skip-transcoders" if loaded.transcoder else "SAEs with a skip connection"
        raise AtlasError(f"SAELens has no class for {what}", "export --format sparsify")
    site = loaded.site
    if not site:
        raise AtlasError(f"{source} does not say which site it reads", "import it with --site first")
    model = model or loaded.model
    if not model:
        raise AtlasError(f"{source} does not say which model it reads", "pass --model")
    training = loaded.meta.get("training") or {}
    save_sae(out, loaded.sae, 1.0, site, model, training=training, metrics=loaded.metrics,
             context_size=int(training.get("ctx_len") or 128), corpus=training.get("corpus"),
             output_site=loaded.output_site, transcoder=loaded.transcoder)
    return out
