"""Other tools' names for activation sites, mapped to ours where they mean the same tensor.

- TransformerLens hook names (what SAELens cfgs carry): `blocks.L.hook_resid_post`,
  `blocks.L.hook_mlp_out`, `blocks.L.hook_attn_out`, `blocks.L.ln2.hook_normalized` (the MLP's
  input after its norm; circuit-tracer transcoders call it `blocks.L.mlp.hook_in`), and
  `blocks.L.hook_resid_pre` (= resid_post.(L-1)). TransformerLens's `blocks.L.hook_mlp_in` is the
  residual stream *before* the pre-MLP norm, which is no site of ours.
- Module paths (sparsify hookpoints, relative to the base model; SAELens's hf_hook_name): a block
  `layers.L` / `h.L` / `model.layers.L` / `gpt_neox.layers.L` outputs resid_post.L and reads
  resid_post.(L-1); its MLP module outputs mlp_out.L and reads mlp_in.L; its attention module
  outputs attn_out.L. Where a family normalises the MLP / attention output before adding it to the
  residual stream (Gemma 2/3, OLMo 2), the module's own output is *not* mlp_out / attn_out:
  check_native_hook refuses that combination once the model is known.
"""

from __future__ import annotations

import re

from store.errors import AtlasError

_TL_OUT = {"resid_post": "resid_post", "mlp_out": "mlp_out", "attn_out": "attn_out"}
_BLOCK = r"(?:model\.|gpt_neox\.|transformer\.|model\.language_model\.)?(?:layers|h)\.(\d+)"
_ATTN = ("self_attn", "attn", "attention")


def hook_name_for(site: str) -> str:
    """Our site name as a TransformerLens hook name (what SAELens cfgs use)."""
    kind, layer = site.split(".")
    if kind == "mlp_in":
        return f"blocks.{layer}.ln2.hook_normalized"
    return f"blocks.{layer}.hook_{kind}"


def site_from_hook(hook: str | None) -> str | None:
    """A TransformerLens hook name, or the output of a module path, as our site (None if none)."""
    if not hook:
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out|resid_pre)", hook)
    if m:
        layer, kind = int(m.group(1)), m.group(2)
        if kind == "resid_pre":
            return f"resid_post.{layer - 1}" if layer > 0 else None
        return f"{_TL_OUT[kind]}.{layer}"
    m = re.fullmatch(r"blocks\.(\d+)\.(?:ln2\.hook_normalized|mlp\.hook_in)", hook)
    if m:
        return f"mlp_in.{m.group(1)}"
    return module_output_site(hook)


def _split_module(path: str) -> tuple[int, str] | None:
    """(layer, part) for a module path inside a block: part is '' for the block itself."""
    m = re.fullmatch(_BLOCK + r"(?:\.([\w.]+))?", path.removesuffix(".output"))
    if not m:
        return None
    return int(m.group(1)), m.group(2) or ""


def module_output_site(path: str) -> str | None:
    """The site a module's output is, for block, MLP, attention and post-norm modules."""
    parts = _split_module(path)
    if parts is None:
        return None
    layer, part = parts
    kind = {"": "resid_post", "mlp": "mlp_out", "post_feedforward_layernorm": "mlp_out",
            "pre_feedforward_layernorm": "mlp_in"}.get(part)
    if kind is None and part in _ATTN:
        kind = "attn_out"
    return f"{kind}.{layer}" if kind else None


def module_input_site(path: str) -> str | None:
    """The site a module's input is (what a sparsify transcoder on that module reads)."""
    parts = _split_module(path)
    if parts is None:
        return None
    layer, part = parts
    if part == "":
        return f"resid_post.{layer - 1}" if layer > 0 else None
    if part == "mlp":
        return f"mlp_in.{layer}"
    return None


def check_native_hook(native_hook: str | None, lm, output_site: str | None, input_site: str | None = None) -> None:
    """Refuse an SAE whose tool hooked a module (sparsify) that, on this model, is not the module
    our site reads: e.g. `layers.6.mlp` on Gemma 2, whose mlp_out.6 is the output of the
    post-feedforward norm, not of the MLP module. `output_site` is the module's output (an SAE's
    site, a transcoder's output site), `input_site` its input (a transcoder's site)."""
    if not native_hook or _split_module(native_hook) is None:
        return
    try:
        module = lm.model.base_model.get_submodule(native_hook.removesuffix(".output"))
    except AttributeError:
        raise AtlasError(f"the SAE was trained on module {native_hook}, which {lm.name} does not have",
                         "pass the --model it was trained on") from None
    checks = [output_site] + ([input_site] if input_site and input_site.startswith("mlp_in.") else [])
    for site in checks:
        if site is None:
            continue
        ours = lm.site_module(lm.site(site))
        if ours is not module:
            raise AtlasError(
                f"the SAE was trained on module {native_hook}, but on {lm.name} {site} is read at "
                f"{lm.module_path(ours)}", "SAE Atlas has no site for that module's raw output on this model family")
