"""EleutherAI sparsify folders, built as sparsify 1.3.3 writes them, against sparsify's own forward.

Files: `SparseCoder.save_to_disk(path)` writes sae.safetensors = the module's state_dict
(encoder.weight [F, D], encoder.bias [F], W_dec [F, D], b_dec [D], and W_skip [D, D] with
skip_connection) and cfg.json = SparseCoderConfig.to_dict() plus d_in; the trainer names the folder
after the hookpoint (`layers.3`, `layers.3.mlp`), `hookpoint/seedN` with several seeds.

The reference (references.sparsify_forward) is written from sparsify's source (sparse_coder.py,
fused_encoder.py):
  encode: x - b_dec unless transcode; pre = relu(x @ encoder.weight^T + encoder.bias); top k of pre
  forward: sum of the top values times W_dec rows + b_dec (+ x @ W_skip^T)
A transcoder on module M reads M's input and predicts M's output.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from store.errors import AtlasError
from tests.conformance.layouts import sparsify_folder
from tests.conformance.references import sparsify_forward
from trainer.formats import load_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, K = 16, 5


def inputs(seed=1, n=80):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 1.5 + torch.randn(D, generator=g)


@pytest.mark.parametrize("hookpoint, transcode, skip, site, output_site", [
    ("layers.3", False, False, "resid_post.3", None),
    ("layers.3.mlp", False, False, "mlp_out.3", None),
    ("layers.3", False, True, "resid_post.3", None),
    ("layers.3.mlp", True, False, "mlp_in.3", "mlp_out.3"),
    ("layers.3.mlp", True, True, "mlp_in.3", "mlp_out.3"),
    ("h.2.mlp", True, False, "mlp_in.2", "mlp_out.2"),  # GPT-2's module names
])
def test_sparsify_coders_match_sparsify(tmp_path, hookpoint, transcode, skip, site, output_site):
    t, cfg = sparsify_folder(tmp_path / hookpoint, transcode, skip, seed=len(hookpoint) + 2 * transcode + skip)
    loaded = load_sae(tmp_path / hookpoint)
    assert (loaded.source_format, loaded.architecture, loaded.sae.cfg.k) == ("sparsify", "topk", K)
    assert (loaded.transcoder, loaded.site, loaded.output_site, loaded.native_hook) == (transcode, site, output_site, hookpoint)
    x = inputs(seed=3 + transcode)
    f_ref, out_ref = sparsify_forward(t, cfg, x)
    with torch.no_grad():
        f, out = loaded.sae.encode_dense(x), loaded.sae(x)
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)


def test_several_seeds_are_named_hookpoint_slash_seed(tmp_path):
    sparsify_folder(tmp_path / "layers.5.mlp" / "seed1", transcode=True)
    loaded = load_sae(tmp_path / "layers.5.mlp" / "seed1")
    assert (loaded.site, loaded.output_site) == ("mlp_in.5", "mlp_out.5")


def test_a_block_transcoder_reads_the_previous_residual_stream(tmp_path):
    sparsify_folder(tmp_path / "layers.4", transcode=True)
    loaded = load_sae(tmp_path / "layers.4")
    assert (loaded.site, loaded.output_site) == ("resid_post.3", "resid_post.4")


@pytest.mark.parametrize("change, message", [
    (lambda c, t: c.update(activation="groupmax"), "'groupmax' is not supported"),
    (lambda c, t: c.update(k=0), "integer k"),
    (lambda c, t: c.update(d_in=32), "d_in=32"),
    (lambda c, t: c.update(num_latents=10), "num_latents=10"),
    (lambda c, t: c.update(skip_connection=True), "lacks W_skip"),
    (lambda c, t: t.pop("encoder.bias"), "lacks encoder.bias"),
])
def test_what_cannot_be_read_exactly_is_refused(tmp_path, change, message):
    t, cfg = sparsify_folder(tmp_path / "layers.1")
    change(cfg, t)
    save_file(t, str(tmp_path / "layers.1" / "sae.safetensors"))
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AtlasError, match=message):
        load_sae(tmp_path / "layers.1")
