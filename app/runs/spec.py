"""What a training run is asked to do, validated before it is queued.

A RunSpec is what the browser form, `POST /api/v1/runs` and `sae-atlas train --submit` all send.
Validation happens at submission so that a bad config is refused with its reason instead of
failing later on a GPU box: field ranges (pydantic), the sweep itself (TrainConfig.validate:
architectures, k < width, tokens >= one batch), the model (an alias, a local folder or .gguf, or a
Hub id) and its sites (checked against the model's depth whenever the depth can be read without
loading weights), and the corpus spec.

A run whose sites name MLPs to transcode (mlp.L, mlp.A-B, mlp.*) trains transcoder sets: every
block's transcoder from one LM pass, one set per configuration of the sweep. The queue publishes
and registers sets whole, so their sites must cover every block of the model (checked against its
depth, which must be readable without loading weights); `mlp.*` is stored as the explicit range
`mlp.0-<last>`. Transcoders and SAEs of other sites go in separate runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from store.errors import AtlasError
# every name a run will publish under is checked at submission, so a sweep never fails at its end
from store.publish import PUBLISHED_NAME_RE
from trainer.config import ARCHITECTURES, TrainConfig

# Every default below is TrainConfig's (and through it SAEConfig's): one home for each, so the form,
# the API, `--submit` and a local `sae-atlas train` train the same SAE.
DEFAULTS = TrainConfig()
Architecture = Literal[ARCHITECTURES]  # the trainer's own list, so a new architecture is offered everywhere
MAX_SWEEP = 32
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
LONGEST_DEFAULT_NAME = f"run-{2**31 - 1}"  # runs without a name publish as run-<id>
DEEPEST_CHECKED = 1000  # transcoder sites may name blocks below this (no LM here has 1000 blocks)


class RunSpec(BaseModel):
    """One training run: a single SAE or a sweep over sites, architectures, widths and k values."""

    model_config = {"extra": "forbid"}

    name: str | None = Field(None, pattern=f"^{NAME_RE}$",
                             description="name of the published SAE (a sweep's prefix); default run-<id>")
    description: str = Field("", max_length=2000)
    model: str = Field(DEFAULTS.model, min_length=1, max_length=500,
                       description="alias, local folder, .gguf file or Hugging Face id")
    sites: list[str] = Field(default_factory=lambda: list(DEFAULTS.site), min_length=1, max_length=8)
    arch: list[Architecture] = Field(default_factory=lambda: list(DEFAULTS.arch), min_length=1, max_length=5)
    width: list[int] = Field(default_factory=lambda: list(DEFAULTS.width), min_length=1, max_length=8)
    k: list[int] = Field(default_factory=lambda: list(DEFAULTS.k), min_length=1, max_length=8,
                         description="TopK family: active latents per token; JumpReLU: the L0 it aims at")
    l1_coefficient: float | None = Field(None, gt=0, le=1000, description="ReLU SAEs: L1 lambda (blank: the library default)")
    l0_coefficient: float | None = Field(None, gt=0, le=1000,
                                         description="JumpReLU SAEs: Gemma Scope's L0 lambda (blank: aim L0 at k)")
    tokens: int = Field(DEFAULTS.tokens, ge=1, le=10**11, description="training tokens per SAE")
    batch_size: int = Field(DEFAULTS.batch_size, ge=16, le=1 << 20)
    lr: float | None = Field(None, gt=0, lt=1)
    corpus: str = Field(DEFAULTS.corpus, min_length=1, max_length=500)
    text_field: str = Field(DEFAULTS.text_field, min_length=1, max_length=100)
    ctx_len: int = Field(DEFAULTS.ctx_len, ge=4, le=32_768)
    eval_fraction: float = Field(DEFAULTS.eval_fraction, ge=0.01, lt=1)
    seed: int = Field(DEFAULTS.seed, ge=0, le=2**31 - 1)
    analyze_tokens: int | None = Field(None, ge=1_000, le=10**10,
                                       description="tokens for the dashboards; blank: 1,000,000 for SAEs, 100,000 for a "
                                                   "transcoder set (its one LM pass caches every block's input)")
    analyze_split: Literal["eval", "train", "all"] = "eval"
    gpus: int = Field(1, ge=1, le=64, description="devices; more than one trains data-parallel under torchrun")
    device: str = Field(DEFAULTS.device, pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = DEFAULTS.lm_dtype
    priority: int = Field(0, ge=-1000, le=1000)
    skip_connection: bool = Field(DEFAULTS.skip_connection,
                                  description="transcoder runs: skip-transcoders (a learned d x d skip term)")
    set_publish: Literal["light", "full"] = Field(
        "light", description="transcoder runs: light samples each block's embedding score and relates no SAEs "
                             "(trainer.transcoders.publish_set); full scores every latent and relates the blocks")

    @field_validator("width", "k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x <= 0 or x > 1 << 24 for x in v):
            raise ValueError("values must be in 1..16777216")
        return sorted(set(v))

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        from trainer.sources import is_transcoder_spec, parse_site

        from trainer.sources import transcoder_layers

        out = []
        for s in v:
            try:
                if is_transcoder_spec(s):
                    if any(int(n) >= DEEPEST_CHECKED for n in re.findall(r"\d+", s)):
                        raise ValueError(f"transcoder site {s!r} names blocks past {DEEPEST_CHECKED - 1}; no model has them")
                    transcoder_layers(s)  # its form; the blocks are checked against the model's depth later
                    out.append(s.strip())
                else:
                    out.append(parse_site(s).name)
            except AtlasError as exc:
                raise ValueError(exc.one_line()) from None
        transcoders = [s for s in out if is_transcoder_spec(s)]
        if transcoders and len(transcoders) < len(out):
            others = [s for s in out if not is_transcoder_spec(s)]
            raise ValueError(f"sites {', '.join(transcoders)} train transcoder sets and {', '.join(others)} SAEs: "
                             "the run queue trains one or the other in a run; submit two runs")
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _sweep(self):
        from trainer.config import USES_K

        n = 0
        for arch in dict.fromkeys(self.arch):
            n += len(self.sites) * len(self.width) * (len(self.k) if arch in USES_K else 1)
        if n > MAX_SWEEP:
            raise ValueError(f"the sweep has {n} SAEs; at most {MAX_SWEEP} per run")
        try:
            self.train_config(Path("unused")).validate()
        except AtlasError as exc:
            raise ValueError(exc.one_line()) from None
        # names are longest at the deepest block: mlp.999 stands in for mlp.* (whose depth is not known here)
        deepest = [f"mlp.{DEEPEST_CHECKED - 1}" if s.strip() == "mlp.*" else s for s in self.sites]
        for _, published in self.model_copy(update={"sites": deepest}).outputs(self.name or LONGEST_DEFAULT_NAME):
            if not PUBLISHED_NAME_RE.fullmatch(published):
                raise ValueError(f"the SAE name {published!r} is too long to publish (at most 128 characters); "
                                 "choose a shorter name")
        if self.gpus > 1 and self.device == "cpu":
            raise ValueError("gpus > 1 needs CUDA devices; use device auto or cuda")
        return self

    def train_config(self, out: Path, **overrides) -> TrainConfig:
        kw = {"out": out, "model": self.model, "site": list(self.sites), "arch": list(self.arch),
              "width": list(self.width), "k": list(self.k), "tokens": self.tokens, "batch_size": self.batch_size,
              "lr": self.lr, "corpus": self.corpus, "text_field": self.text_field, "ctx_len": self.ctx_len,
              "eval_fraction": self.eval_fraction, "seed": self.seed, "device": self.device,
              "lm_dtype": self.lm_dtype, "l1_coefficient": self.l1_coefficient, "l0_coefficient": self.l0_coefficient,
              "skip_connection": self.skip_connection}
        return TrainConfig(**{**kw, **overrides})

    @property
    def trains_transcoders(self) -> bool:
        from trainer.sources import is_transcoder_spec

        return any(is_transcoder_spec(s) for s in self.sites)

    def analysis_tokens(self) -> int:
        """analyze_tokens, or its default: a set's analysis caches n_blocks x d_model values per token."""
        from trainer.transcoders.publish_set import DEFAULT_TOKENS

        if self.analyze_tokens is not None:
            return self.analyze_tokens
        return DEFAULT_TOKENS if self.trains_transcoders else 1_000_000

    def outputs(self, prefix: str, n_layers: int | None = None) -> list[tuple[str, str]]:
        """(folder under the run's output, published SAE name) for every SAE of the run: a single
        SAE is published as `prefix`, a sweep's members as `prefix-<site>-<arch>-w<width>[-k<k>]`,
        a transcoder set's blocks as `<set name>-L<layer>` (transcoder_sets). n_layers: the model's
        depth, needed while a site is still `mlp.*` (validate_spec stores it as a range)."""
        if self.trains_transcoders:
            return [out for _, _, blocks in self.transcoder_sets(prefix, n_layers) for out in blocks.values()]
        from trainer.config import sae_name

        configs = self.train_config(Path("unused")).sae_configs(1)
        if len(configs) == 1:
            return [("", prefix)]
        return [(sae_name(site, cfg), f"{prefix}-{sae_name(site, cfg)}") for site, cfg in configs]

    def transcoder_sets(self, prefix: str, n_layers: int | None = None) -> list[tuple[str, str, dict[int, tuple[str, str]]]]:
        """(manifest file under the run's output, registered set name, block -> (folder, published
        name)) for every set of a transcoder run, as the trainer lays them out (trainer.train,
        trainer.transcoders.sets): one set is registered as `prefix`, a sweep's sets as
        `prefix-<arch>-w<width>[-k<k>]`."""
        from trainer.config import sae_name
        from trainer.sources import expand_sites, transcoder_layers
        from trainer.transcoders.publish_set import block_name
        from trainer.transcoders.sets import SET_FILE, set_groups

        cfg = self.train_config(Path("unused"))
        cfg.site = expand_sites(cfg.site, n_layers)
        if any(transcoder_layers(s) is None for s in cfg.site):
            raise AtlasError(f"the blocks of {', '.join(self.sites)} are unknown until the model's depth is known")
        configs = cfg.sae_configs(1)
        entries = [(transcoder_layers(site)[0], "" if len(configs) == 1 else sae_name(site, c), c) for site, c in configs]
        groups = set_groups(entries)
        out = []
        for tag, group in groups.items():
            name = prefix if len(groups) == 1 else f"{prefix}-{tag}"
            manifest = SET_FILE if len(groups) == 1 else f"transcoder_set.{tag}.json"
            out.append((manifest, name, {layer: (folder, block_name(name, layer)) for layer, folder, _ in group}))
        return out


# --- local paths: confined to the configured roots ----------------------------------------------

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class OutsideRoots(AtlasError):
    """A local path of a run that is not under the folders runs may read (422, whether or not it exists)."""


def _is_local_model(value: str) -> bool:
    """Local models are written as paths: absolute, ~/…, ./… or ../…, or a .gguf file name; anything
    else is an alias or a Hub id (org/name), resolved without looking at the disk."""
    return value.startswith(("/", "~", "./", "../")) or value.endswith(".gguf") or value in (".", "..")


def confine(value: str, roots: list[Path], what: str, env: str) -> Path:
    """The path `value` resolved (symlinks followed), if it lies under one of `roots`.

    Absolute and ~ paths are taken as they are; relative ones are looked up under each root in
    turn. The error for a path outside the roots is the same whether or not it exists, and nothing
    outside the roots is ever stat'ed."""
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [root / path for root in roots]
    inside = []
    for candidate in candidates:
        resolved = Path(os.path.realpath(candidate))  # follows symlinks without requiring existence
        if any(resolved == root or resolved.is_relative_to(root) for root in roots):
            inside.append(resolved)
    if not inside:
        raise OutsideRoots(f"{what} {value!r} is not under the folders training runs may read",
                           f"put it under DATA_DIR/{'corpora' if what == 'corpus' else 'models'} or list its folder in {env}")
    return next((p for p in inside if p.exists()), inside[0])


def shown_path(value: str, roots: list[Path]) -> str:
    """A confined path as the public sees it: relative to its root (`./wiki/part1.jsonl`), which
    resolves back to the same file when submitted again; host paths outside the roots are hidden."""
    if not value.startswith(("/", "~")):
        return value
    path = Path(os.path.realpath(Path(value).expanduser()))
    for root in roots:
        if path == root or path.is_relative_to(root):
            return "./" + path.relative_to(root).as_posix() if path != root else "."
    return "(a local path)"


def confine_spec(spec: RunSpec) -> RunSpec:
    """The spec with its local model and corpus paths resolved and checked against the roots
    (OutsideRoots otherwise). Aliases, Hub ids, pydoc and hf: corpora pass unchanged."""
    from store.settings import get_settings

    s = get_settings()
    update = {}
    if _is_local_model(spec.model):
        update["model"] = str(confine(spec.model, s.model_root_dirs, "model", "SAE_ATLAS_MODEL_ROOTS"))
    if spec.corpus != "pydoc" and not spec.corpus.startswith("hf:"):
        update["corpus"] = str(confine(spec.corpus, s.corpus_root_dirs, "corpus", "SAE_ATLAS_CORPUS_ROOTS"))
    return spec.model_copy(update=update) if update else spec


def public_spec(spec: dict) -> dict:
    """A stored spec as API responses and pages show it: local paths relative to their roots."""
    from store.settings import get_settings

    s = get_settings()
    out = dict(spec)
    if isinstance(out.get("model"), str):
        out["model"] = shown_path(out["model"], s.model_root_dirs)
    if isinstance(out.get("corpus"), str) and out["corpus"] != "pydoc" and not out["corpus"].startswith("hf:"):
        out["corpus"] = shown_path(out["corpus"], s.corpus_root_dirs)
    return out


def check_model(model: str) -> int | None:
    """The model's depth when it can be read without weights; AtlasError for unknown aliases and
    malformed names. Hub ids are never looked up on the local disk (only in the Hub cache)."""
    from trainer.sources import ALIASES, hub_depth, model_depth

    if model in ALIASES or _is_local_model(model):
        return model_depth(model)
    if HUB_ID.fullmatch(model) and ".." not in model.split("/"):
        return hub_depth(model)
    if re.fullmatch(r"[\w.-]+", model):
        raise AtlasError(f"unknown model alias {model!r}",
                         f"aliases: {', '.join(ALIASES)}; Hugging Face models are named org/name, e.g. openai-community/gpt2; "
                         "local models are paths (./NAME under DATA_DIR/models, or absolute)")
    raise AtlasError(f"unknown model {model!r}",
                     f"use an alias ({', '.join(ALIASES)}), a local folder or .gguf file, or a Hugging Face id like org/name")


def check_corpus(spec: str) -> None:
    if spec == "pydoc":
        return
    if spec.startswith("hf:"):
        if not re.fullmatch(r"hf:[\w.\-/]+(:[\w.\-]+)?(@[\w.\-\[\]:%]+)?", spec):
            raise AtlasError(f"bad corpus spec {spec!r}", "use hf:NAME[:CONFIG][@SPLIT], e.g. hf:allenai/c4:en@train")
        return
    path = Path(spec)
    if not path.exists():
        raise AtlasError(f"corpus {spec!r} does not exist",
                         "use pydoc, a .txt/.jsonl/.parquet file or folder under DATA_DIR/corpora, or hf:NAME")
    if path.is_file() and path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise AtlasError(f"cannot read corpus {spec!r}: unsupported file type {path.suffix!r}",
                         "use .txt, .jsonl or .parquet")


def validate_spec(spec: RunSpec) -> RunSpec:
    """The checks that look outside the spec itself; returns the spec to store, with its local
    paths resolved. Paths are confined to the roots first, so nothing else about a path outside
    them is looked at or told; then the model (and its depth, read without weights: sites are
    checked against it), the corpus."""
    from trainer.sources import parse_site

    spec = confine_spec(spec)
    depth = check_model(spec.model)
    if spec.trains_transcoders:
        spec = whole_sets(spec, depth)
    elif depth is not None:
        for s in spec.sites:
            parse_site(s, depth)
    check_corpus(spec.corpus)
    return spec


def whole_sets(spec: RunSpec, depth: int | None) -> RunSpec:
    """A transcoder run's spec with `mlp.*` written as `mlp.0-<last>`, after checking that its
    sites name blocks of the model and cover all of them: the queue publishes and registers every
    set whole (attribution graphs need a transcoder in every block)."""
    from trainer.sources import transcoder_layers

    if depth is None:
        raise AtlasError(f"the depth of {spec.model!r} cannot be read without loading it, so its transcoder set "
                         "cannot be checked before training",
                         "download the model first (its config.json in the Hugging Face cache is enough), or use a "
                         "local folder under the model roots")
    layers: set[int] = set()
    for s in spec.sites:
        layers.update(transcoder_layers(s, depth))  # AtlasError for a block the model lacks
    missing = sorted(set(range(depth)) - layers)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise AtlasError(f"the transcoder sites {', '.join(spec.sites)} leave block(s) {shown} of the model's {depth} "
                         "without a transcoder; the run queue trains whole transcoder sets",
                         "use mlp.* (every block), or train single blocks with `sae-atlas train --site mlp.L`")
    sites = [f"mlp.0-{depth - 1}" if s.strip() == "mlp.*" else s for s in spec.sites]
    return spec.model_copy(update={"sites": list(dict.fromkeys(sites))})
