"""Bring an SAE from elsewhere (SAELens, Gemma Scope, EleutherAI sparsify) into DATA_DIR/saes/NAME."""

from __future__ import annotations

import shutil
from pathlib import Path

from store.errors import AtlasError
from store.settings import get_settings
from trainer.formats import load_sae, save_sae
from trainer.sources import parse_site


def import_sae(source: Path, model: str, site: str | None, name: str, overwrite: bool = False,
               output_site: str | None = None) -> Path:
    """Validate the folder, then save it in our SAELens layout with model and site(s) recorded.

    A transcoder reads `site` and predicts `output_site` (both default to what the folder says)."""
    from store.publish import check_name

    check_name(name)
    loaded = load_sae(source)
    site = site or loaded.site
    if not site:
        raise AtlasError(f"{source} does not say which site it reads", "pass --site, e.g. resid_post.12")
    parse_site(site)
    if loaded.transcoder:
        output_site = output_site or loaded.output_site
        if not output_site:
            raise AtlasError(f"{source} is a transcoder that does not say which site it predicts",
                             "pass --output-site, e.g. mlp_out.12")
        parse_site(output_site)
    elif output_site:
        raise AtlasError(f"{source} is an autoencoder of its site, not a transcoder", "drop --output-site")
    dest = get_settings().data_dir / "saes" / name
    if dest.exists():
        if not overwrite:
            raise AtlasError(f"{dest} already exists", "pass --overwrite or choose another --name")
        shutil.rmtree(dest)
    training = {"imported_from": str(Path(source).resolve()), "source_format": loaded.source_format}
    if loaded.native_hook:
        training["native_hook"] = loaded.native_hook
    save_sae(dest, loaded.sae, 1.0, site, model, training=training, metrics=loaded.metrics,
             output_site=output_site, transcoder=loaded.transcoder)
    return dest
