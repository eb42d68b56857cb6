"""The spliced-in LM loss on the tiny model: exact anchors and the confidence interval.

An identity SAE (a ReLU SAE with W_enc = W_dec = [I; -I], so relu(x) - relu(-x) = x exactly)
splices in the activations it reads, bit for bit: CE recovered must be exactly 1 and delta LM loss
exactly 0. A zero SAE (W_dec = 0, b_dec = 0) splices in zeros, which is the zero ablation: CE
recovered must be exactly 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluate import Evaluated, ce_interval, spliced_lm_loss
from trainer.sae import SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity_sae(d: int):
    sae = build_sae(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int):
    sae = build_sae(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu"))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def contexts(tiny_lm, n: int, per_batch: int = 4, length: int = 24):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, tiny_lm.vocab_size, (n, length), generator=gen)
    tokens[:, 0] = tiny_lm.bos_token_id
    return [tokens[i:i + per_batch] for i in range(0, n, per_batch)]


def test_identity_sae_recovers_exactly_1_and_zero_sae_exactly_0(tiny_lm):
    d = tiny_lm.d_model
    models = [Evaluated(identity_sae(d), "resid_post.1", 1.0), Evaluated(zero_sae(d), "resid_post.1", 1.0)]
    out = spliced_lm_loss(tiny_lm, models, contexts(tiny_lm, 8), max_contexts=8, min_contexts=8)
    identity, zero = out[0], out[1]
    assert identity["ce_contexts"] == zero["ce_contexts"] == 8
    assert identity["ce_recovered"] == 1.0 and identity["delta_lm_loss"] == 0.0
    assert identity["ce_recovered_ci95"] == 0.0 and identity["delta_lm_loss_ci95"] == 0.0
    assert zero["ce_recovered"] == 0.0 and zero["ce_sae"] == zero["ce_zero_ablation"]
    assert zero["ce_zero_ablation"] != zero["ce_clean"]  # the ratio is defined (a random model barely cares)


def test_contexts_are_added_until_the_interval_is_met_or_the_cap(tiny_lm):
    d = tiny_lm.d_model
    torch.manual_seed(0)
    noisy = identity_sae(d)
    with torch.no_grad():
        noisy.W_dec.mul_(0.7)  # a lossy reconstruction: per-context losses now vary
    model = [Evaluated(noisy, "resid_post.1", 1.0)]
    capped = spliced_lm_loss(tiny_lm, model, contexts(tiny_lm, 40), max_contexts=12, min_contexts=4, target=1e-9)[0]
    assert capped["ce_contexts"] == 12 and capped["ce_ci_met"] is False
    assert capped["ce_recovered_ci95"] > 0
    exact = [Evaluated(identity_sae(d), "resid_post.1", 1.0)]  # interval 0: met as soon as allowed
    met = spliced_lm_loss(tiny_lm, exact, contexts(tiny_lm, 40), max_contexts=40, min_contexts=8, target=1e-9)[0]
    assert met["ce_contexts"] == 8 and met["ce_ci_met"] is True


def test_interval_covers_the_truth_at_the_stated_rate():
    """Per-context losses drawn from a known distribution: the 95% intervals of CE recovered and
    delta LM loss contain the true values in about 95% of repeated experiments."""
    rng = np.random.default_rng(0)
    true_delta, true_gap = 0.1, 10.0  # E[sae - clean], E[zero - clean]
    true_recovered = 1 - true_delta / true_gap
    hits_r = hits_d = 0
    trials = 2000
    for _ in range(trials):
        clean = rng.normal(3.0, 0.5, 60)
        zero = clean + rng.normal(true_gap, 2.0, 60)
        sae = clean + true_delta + 0.3 * (zero - clean - true_gap) / 2.0 + rng.normal(0, 0.05, 60)
        m = ce_interval(clean, zero, sae)
        hits_r += abs(m["ce_recovered"] - true_recovered) <= m["ce_recovered_ci95"]
        hits_d += abs(m["delta_lm_loss"] - true_delta) <= m["delta_lm_loss_ci95"]
    assert 0.93 <= hits_r / trials <= 0.97 and 0.93 <= hits_d / trials <= 0.97, (hits_r, hits_d)
