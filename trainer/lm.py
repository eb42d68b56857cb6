"""Load language models, name their activation sites, and read or replace activations with hooks.

Models come from an alias (the bundled `smollm2-135m`), a local folder, a `.gguf` file, or a
Hugging Face id. GGUF weights are de-quantised by transformers once and cached as safetensors
under DATA_DIR/models, so later loads take about a second.

Sites are named `resid_post.L` (the residual stream after block L), `mlp_out.L` and `attn_out.L`
(what the MLP / attention of block L adds to the residual stream: for families with post-norms,
Gemma 2/3 and OLMo 2, the output of the post-feedforward / post-attention norm) and `mlp_in.L` (what
the MLP reads: the input of the MLP module, i.e. after the pre-MLP norm). Reading stops the forward
pass after the deepest block that holds a hooked site.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from store.errors import AtlasError
from store.settings import get_settings
from trainer.sources import (  # noqa: F401  (re-exported: callers import them from here too)
    ALIASES,
    SITE_KINDS,
    Alias,
    Site,
    parse_site,
    resolve_source,
)

log = logging.getLogger(__name__)

# Order of the sites of one block in the forward pass (GPT-NeoX's parallel blocks compute attention
# and MLP from the same input, but attn_out is still read before mlp_in there).
SITE_ORDER = {"attn_out": 0, "mlp_in": 1, "mlp_out": 2, "resid_post": 3}

@dataclass(frozen=True)
class Family:
    """Where the parts of one transformer family live (attribute paths from the CausalLM; attn,
    mlp and the *_out paths from a block)."""

    blocks: str
    attn: str
    mlp: str
    final_norm: str
    unembed: str  # informational: the unembedding is read through get_output_embeddings()
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    # The module whose output is added to the residual stream, where that is not attn / mlp itself:
    # Gemma 2/3 and OLMo 2 normalise the attention and MLP outputs before adding them. (In Llama and
    # Gemma 1, `post_attention_layernorm` is the norm *before* the MLP: not an output at all.)
    attn_out: str | None = None
    mlp_out: str | None = None


_LLAMA = Family("model.layers", "self_attn", "mlp", "model.norm", "lm_head")
_GEMMA = Family("model.layers", "self_attn", "mlp", "model.norm", "lm_head", norm_offset=1.0)
_GEMMA2 = Family("model.layers", "self_attn", "mlp", "model.norm", "lm_head", norm_offset=1.0,
                 attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
_OLMO2 = Family("model.layers", "self_attn", "mlp", "model.norm", "lm_head",
                attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo2": _OLMO2,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": Family("transformer.h", "attn", "mlp", "transformer.ln_f", "lm_head"),
    "gpt_neox": Family("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm", "lm_head"),
}


def _get(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def pick_device(requested: str | None = None) -> torch.device:
    if requested in (None, "", "auto"):  # "auto" on the command line defers to SAE_ATLAS_DEVICE
        requested = get_settings().device
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise AtlasError(f"unknown device {requested!r}", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AtlasError(f"device {requested!r} asked for, but CUDA is not available", "use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX tiles make bfloat16 matmuls several times faster than float32 on this CPU."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """The CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): an SAE's dense encoder
    matmul in bfloat16 is then several times faster than in float32 (4096x576 by 576x4608 on the
    2-core AMD EPYC with AVX512-BF16: 174 against 45 GFLOP/s). Read once per process (the
    embedder asks on every call)."""
    if cpu_has_fast_bf16():
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in fh)
    except OSError:
        return False


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested in (None, "", "auto"):
        requested = get_settings().lm_dtype
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    except KeyError:
        raise AtlasError(f"unknown dtype {requested!r}", "use auto, float32, bfloat16 or float16") from None


class _StopForward(Exception):
    """Raised by the deepest read hook: the rest of the network is not needed."""


@dataclass
class LoadedLM:
    model: nn.Module
    tokenizer: object
    name: str
    source: str
    family: Family

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.unembed_weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.unembed_weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def blocks(self) -> nn.ModuleList:
        return _get(self.model, self.family.blocks)

    @property
    def unembed_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.bos_token_id, getattr(self.config, "bos_token_id", None), tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        raise AtlasError(f"model {self.name} has neither a BOS nor an EOS token", "use another tokenizer")

    @property
    def separator_token_id(self) -> int:
        """Placed between documents packed into one context."""
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else self.bos_token_id

    def site(self, name: str) -> Site:
        return parse_site(name, self.n_layers)

    def site_module(self, site: Site) -> nn.Module:
        """The module whose output is the site (for mlp_in: whose *input* is the site)."""
        block = self.blocks[site.layer]
        f = self.family
        if site.kind == "resid_post":
            return block
        if site.kind == "attn_out":
            return _get(block, f.attn_out or f.attn)
        if site.kind == "mlp_out":
            return _get(block, f.mlp_out or f.mlp)
        return _get(block, f.mlp)  # mlp_in

    def module_path(self, module: nn.Module) -> str | None:
        """A module's dotted name inside the base model (as sparsify names its hookpoints)."""
        for name, m in self.model.base_model.named_modules():
            if m is module:
                return name
        return None

    def direct_logit_weights(self) -> torch.Tensor:
        """W [V, D] in float32 such that W d is the direct effect on the logits of adding d to the
        final residual stream: the unembedding composed with the linear part of the final norm.

        RMSNorm's linear part is d -> d * w (w + 1 for Gemma); LayerNorm's is d -> (d - mean(d)) * w,
        so W = (W_U * w) C with C = I - 11^T/D the centring, i.e. each row of W_U * w minus its mean.
        The norm's division by the (token-dependent) RMS / standard deviation is a positive scale,
        and its bias does not depend on d, so both are left out."""
        w_u = self.unembed_weight.detach().float()
        norm = _get(self.model, self.family.final_norm)
        scale = getattr(norm, "weight", None)
        if scale is not None:
            w_u = w_u * (scale.detach().float() + self.family.norm_offset)[None, :]
        if isinstance(norm, nn.LayerNorm):
            w_u = w_u - w_u.mean(dim=1, keepdim=True)
        return w_u

    def vocab_strings(self) -> list[str]:
        """Every token id rendered as text (what a page shows for it)."""
        tok = self.tokenizer
        n = self.vocab_size
        out = []
        for i in range(n):
            try:
                out.append(tok.decode([i]) if i < len(tok) else f"<unused {i}>")
            except Exception:  # some tokenizers refuse lone special ids
                out.append(f"<{i}>")
        return out

    # --- reading and replacing activations ---------------------------------------------------

    def hook_site(self, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """The one place that hooks a site: fn(a) sees the site's activations a [B, T, D] on every
        forward pass and returns their replacement, or None to leave them as they are. mlp_in is
        the MLP module's input (a pre-hook); the other kinds are a module's output, whose first
        element it is when the module returns a tuple (blocks, attention)."""
        module = self.site_module(site)
        if site.kind == "mlp_in":
            def pre_hook(_module, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new.to(args[0].dtype),) + tuple(args[1:]), kwargs)
                key = next(iter(kwargs))
                new = fn(kwargs[key])
                return None if new is None else (args, {**kwargs, key: new.to(kwargs[key].dtype)})
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        return _hook_output(module, fn)

    # --- the local replacement model of attribution graphs (trainer.circuits) ---------------

    def hook_embedding(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """Like hook_site, for the token embeddings [B, T, D]: the input embedding module's output
        (Gemma's embedding module applies its sqrt(D) scale itself)."""
        return _hook_output(self.model.get_input_embeddings(), fn)

    def hook_final_norm(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """Like hook_site, for the final norm's output [B, T, D]: what the unembedding reads."""
        return _hook_output(_get(self.model, self.family.final_norm), fn)

    def freeze_for_attribution(self) -> list[RemovableHandle]:
        """Hooks that keep every value of the forward pass but give gradients the network with its
        attention patterns and normalisation scales frozen at this pass's values (circuit-tracer's
        stop-gradients): queries and keys are detached, so gradients reach the residual stream
        only through the values, and each norm passes gradients as the linear map x -> x * s * w
        (LayerNorm: centred first) with s, the token's 1 / RMS or 1 / std, held fixed.

        Register these before any hook that replaces a norm's output (Gemma 2's mlp_out is the
        post-feedforward norm's output): forward hooks run in the order they were registered."""
        handles = []
        try:
            for block in self.blocks:
                handles += _detach_queries_and_keys(_get(block, self.family.attn), self.config)
            for module in self.model.modules():
                hook = _frozen_norm_hook(module, self.family.norm_offset)
                if hook is not None:
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    @torch.inference_mode()
    def read(self, input_ids: torch.Tensor, sites: list[Site]) -> dict[str, torch.Tensor]:
        """Activations [B, T, D] at each site; the forward pass stops after the deepest block."""
        captured: dict[str, torch.Tensor] = {}
        deepest = max(s.layer for s in sites)
        handles = []

        for site in sites:
            handles.append(self.capture(site, captured))
        # Registered last, so it runs after the capture hooks of the deepest block (its output is
        # resid_post.deepest, the last of the block's sites).
        def stop(_a):
            if len(captured) == len(sites):
                raise _StopForward
        handles.append(self.hook_site(Site("resid_post", deepest), stop))
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [s.name for s in sites if s.name not in captured]
        if missing:
            raise RuntimeError(f"hooks did not fire for {missing}")
        return captured

    def capture(self, site: Site, into: dict[str, torch.Tensor]) -> RemovableHandle:
        """Register a hook that stores the site's activations [B, T, D] in into[site.name]."""
        return self.hook_site(site, lambda a: into.__setitem__(site.name, a))

    @torch.inference_mode()
    def logits_with(self, input_ids: torch.Tensor, site: Site | None = None,
                    replace: Callable[..., torch.Tensor] | None = None,
                    source: Site | None = None) -> torch.Tensor:
        """Logits [B, T, V] with the site's activations a replaced by replace(a) (None: clean run).

        With `source` (a site computed earlier in the same forward pass, e.g. a transcoder's
        mlp_in for its mlp_out), replace is called as replace(a, activations at source)."""
        splices = [(site, replace, source)] if site is not None and replace is not None else []
        return self.logits_spliced(input_ids, splices)

    @torch.inference_mode()
    def logits_spliced(self, input_ids: torch.Tensor,
                       splices: list[tuple[Site, Callable[..., torch.Tensor], Site | None]]) -> torch.Tensor:
        """Logits [B, T, V] with several sites replaced in the same forward pass: for each
        (site, replace, source) as in logits_with. A source is read in this very pass, so it sees
        the replacements made upstream of it (every MLP replaced by its transcoder at once)."""
        handles = []
        seen: dict[str, torch.Tensor] = {}
        try:
            for site, replace, source in splices:
                fn = replace
                if source is not None:
                    if (source.layer, SITE_ORDER[source.kind]) >= (site.layer, SITE_ORDER[site.kind]):
                        raise AtlasError(f"{source} is not computed before {site}", "a source site must come earlier")
                    handles.append(self.capture(source, seen))
                    fn = lambda a, replace=replace, source=source: replace(a, seen[source.name])  # noqa: E731
                handles.append(self.hook_site(site, fn))
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()


def _hook_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """fn sees a module's output (its first element, when the module returns a tuple)."""
    def hook(_module, _inputs, output):
        a = output[0] if isinstance(output, tuple) else output
        new = fn(a)
        if new is None:
            return None
        new = new.to(a.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return module.register_forward_hook(hook)


def _only_values(out: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
    """out with gradients kept only where value_mask [D] is 1 (the value part of fused q|k|v)."""
    mask = value_mask.to(out.dtype)
    return out.detach() + (out - out.detach()) * mask


def _detach_queries_and_keys(attn: nn.Module, config) -> list[RemovableHandle]:
    """Stop gradients through an attention layer's queries and keys, which is what freezes its
    pattern softmax(q k^T) for the backward pass; the values still carry gradients."""
    if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
        return [m.register_forward_hook(lambda _m, _i, out: out.detach()) for m in (attn.q_proj, attn.k_proj)]
    if hasattr(attn, "c_attn"):  # GPT-2: one projection to [q | k | v]
        d = attn.c_attn.nf // 3
        mask = torch.cat([torch.zeros(2 * d), torch.ones(d)])
        return [attn.c_attn.register_forward_hook(lambda _m, _i, out: _only_values(out, mask.to(out.device)))]
    if hasattr(attn, "query_key_value"):  # GPT-NeoX: [q | k | v] per head
        heads = int(config.num_attention_heads)
        size = attn.query_key_value.out_features // (3 * heads)
        mask = torch.cat([torch.zeros(2 * size), torch.ones(size)]).repeat(heads)
        return [attn.query_key_value.register_forward_hook(lambda _m, _i, out: _only_values(out, mask.to(out.device)))]
    raise AtlasError(f"cannot freeze the attention pattern of {type(attn).__name__}",
                     "attribution graphs support Llama-, Gemma-, Qwen-, OLMo-, GPT-2- and GPT-NeoX-style attention")


def _frozen_norm_hook(module: nn.Module, offset: float):
    """A forward hook that passes gradients through a norm with its scale held fixed, or None when
    the module is not a norm. The output keeps its value: out.detach() + L(x - x.detach()), where L
    is the norm's linear map at the frozen scale and x - x.detach() is zero with x's gradient."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        centred, eps, weight = True, module.eps, module.weight
    elif name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        centred, weight = False, getattr(module, "weight", None)
        if eps is None:
            raise AtlasError(f"cannot freeze the scale of {name}: it names no epsilon", "use a supported family")
    elif "Norm" in name and any(True for _ in module.parameters(recurse=False)):
        raise AtlasError(f"cannot freeze the scale of the normalisation {name}", "use a supported family")
    else:
        return None
    w = None if weight is None else weight.detach().float() + (0.0 if centred else offset)

    def hook(_module, args, kwargs, out):
        x = args[0] if args else next(iter(kwargs.values()))
        if not (torch.is_grad_enabled() and x.requires_grad):
            return None  # nothing upstream wants gradients (e.g. the detached queries' q_norm)
        xf = x.detach().float()
        if centred:
            xf = xf - xf.mean(-1, keepdim=True)
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        delta = (x - x.detach()).float()
        if centred:
            delta = delta - delta.mean(-1, keepdim=True)
        lin = delta * scale if w is None else delta * scale * w
        return out.detach() + lin.to(out.dtype)
    return hook


# --- loading ---------------------------------------------------------------------------------

def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return get_settings().models_dir / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, cache: Path, dtype: torch.dtype) -> None:
    """De-quantise a GGUF once and save it as a plain transformers folder (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors now; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(str(gguf) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


@lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """The tokenizer of model `name` alone (no weights), from the folder load_lm reads; an
    alias's GGUF must have been converted already (by a first load_lm)."""
    from transformers import AutoTokenizer

    kind, path = resolve_source(name)
    if kind in ("alias", "gguf"):
        folder = _gguf_cache_dir(path)
        if not (folder / "config.json").is_file():
            raise AtlasError(f"model {name!r} is not converted on this machine", "load it once, e.g. `sae-atlas sites MODEL`")
        folder = str(folder)
    else:
        folder = str(path) if path is not None else name
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise AtlasError(f"cannot load the tokenizer of model {name!r}", "the service does not hold this model") from exc


def load_lm(name: str | None = None, device: str | torch.device | None = None, dtype: str | None = None) -> LoadedLM:
    """Load a causal LM for reading activations (eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    name = name or "smollm2-135m"
    kind, path = resolve_source(name)
    device = device if isinstance(device, torch.device) else pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if kind in ("alias", "gguf"):
        cache = _gguf_cache_dir(path)
        if not (cache / "config.json").is_file():
            _convert_gguf(path, cache, torch_dtype)
        folder = str(cache)
    else:
        folder = str(path) if path is not None else name
        if kind == "hub":
            _check_hub(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(
            f"cannot load model {name!r}: {first[:300]}",
            f"use an alias ({', '.join(ALIASES)}), a local folder, a .gguf file, or a Hub id with network access",
        ) from None
    model.to(device).eval().requires_grad_(False)
    model_type = getattr(model.config, "model_type", "")
    family = FAMILIES.get(model_type) or _probe_family(model)
    if family is None:
        raise AtlasError(
            f"model {name!r} has architecture {model_type!r}, which SAE Atlas cannot hook yet",
            f"supported: {', '.join(sorted(FAMILIES))}",
        )
    return LoadedLM(model=model, tokenizer=tokenizer, name=name, source=str(path or name), family=family)


def _check_hub(name: str) -> None:
    """Fail in seconds, not minutes of retries, when a Hub model is neither cached nor reachable."""
    import os

    import httpx
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise AtlasError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1",
                         "download it first or unset HF_HUB_OFFLINE")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        r = httpx.get(f"{endpoint}/api/models/{name}", timeout=8.0, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise AtlasError(f"cannot reach the Hugging Face Hub to download {name!r} ({type(exc).__name__})",
                         f"check the network, or use a local folder, a .gguf file or an alias ({', '.join(ALIASES)})") from None
    if r.status_code == 404:
        raise AtlasError(f"unknown model {name!r}: the Hugging Face Hub has no such model",
                         "check the spelling (org/name), or use a local folder or an alias")


def _probe_family(model: nn.Module) -> Family | None:
    for family in dict.fromkeys(FAMILIES.values()):
        try:
            _get(model, family.blocks), _get(model, family.final_norm)
            return family
        except AttributeError:
            continue
    return None

