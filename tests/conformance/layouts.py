"""How each tool lays out its files: folders written exactly as SAELens 6.54 and sparsify 1.3.3 write them.

- SAELens `SAE.save_model`: cfg.json = cfg.to_dict() (the config dataclass's fields in order, then
  `metadata` and `architecture`), sae_weights.safetensors = the module's state_dict;
- sparsify `SparseCoder.save_to_disk`: sae.safetensors = the state_dict, cfg.json =
  SparseCoderConfig.to_dict() plus d_in, in a folder named after the hookpoint.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from tests.conformance.references import JUMPRELU, TRANSCODERS

D, F, K = 16, 48, 6  # SAELens folders
VERSION = "6.54.12"


def saelens_weights(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A state_dict with the keys and shapes of SAELens's class for `arch`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s  # noqa: E731
    t = {"W_dec": r(F, D, s=0.4), "b_dec": r(D, s=0.7), "W_enc": r(D, F, s=0.4)}
    if arch == "gated":
        t.update(b_gate=r(F, s=0.5), b_mag=r(F, s=0.5), r_mag=r(F, s=0.3))
    else:
        t["b_enc"] = r(F, s=0.5)
    if arch in JUMPRELU:
        t["threshold"] = torch.rand(F, generator=g) * 1.2 - 0.2
    if "skip" in arch:
        t["W_skip"] = r(D, D, s=0.2)
    return t


def saelens_cfg(arch: str, apply_b_dec: bool = True, norm: str = "none", hook: str = "blocks.3.hook_resid_post",
                rescale: bool = False, hook_out: str | None = None) -> dict:
    """cfg.to_dict() of SAELens 6.54's inference config for `arch`."""
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": norm, "reshape_activations": "none",
           "metadata": {"sae_lens_version": VERSION, "sae_lens_training_version": VERSION, "model_name": "gpt2",
                        "hook_name": hook, "hook_head_index": None, "context_size": 128, "prepend_bos": True,
                        "dataset_path": "monology/pile-uncopyrighted", "model_from_pretrained_kwargs": {}}}
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=rescale)
    if arch in TRANSCODERS:
        cfg["d_out"] = D
        cfg["metadata"]["hook_name_out"] = hook_out
    cfg["architecture"] = arch
    return cfg


def write_saelens(folder, cfg: dict, tensors: dict, dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_folder(folder, transcode=False, skip=False, activation="topk", seed=0, d=16, f=64, k=5):
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(f, d, generator=g) * 0.4, "encoder.bias": torch.randn(f, generator=g) * 0.5,
         "W_dec": torch.randn(f, d, generator=g) * 0.3, "b_dec": torch.randn(d, generator=g)}
    if skip:
        t["W_skip"] = torch.randn(d, d, generator=g) * 0.2
    cfg = {"activation": activation, "expansion_factor": 4, "normalize_decoder": not transcode, "num_latents": f,
           "k": k, "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": d}
    folder.mkdir(parents=True)
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t, cfg
