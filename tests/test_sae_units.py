"""Unit tests of the SAE building blocks: sparse kernels, straight-through estimators, decoder-norm
handling, BatchTopK's selection and inference threshold, export round trips and AuxK."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.formats import export_tensors, load_sae, save_sae
from trainer.sae import ARCHITECTURES, SAEConfig, StepContext, build_sae
from trainer.sae.base import SelectedPreacts
from trainer.sae.batchtopk import batch_topk_flat
from trainer.sae.jumprelu import JumpReLUFn, StepFn
from trainer.synthetic import superposition_data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(arch: str, d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, **kw))
    with torch.no_grad():  # move away from the symmetric init so every parameter matters
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def grads(sae) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def dense_reference_loss(sae, x, select: torch.Tensor) -> torch.Tensor:
    """Plain dense autograd: relu(z) on the selected entries only, decoded with a matmul."""
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    f = F.relu(z) * select
    x_hat = f @ sae.W_dec + sae.b_dec
    return (x_hat - x).pow(2).sum(-1).mean()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_kernel_gradients_equal_dense_autograd(arch):
    sae = make(arch)
    x = torch.randn(48, 16) * 2 + 0.5
    ctx = StepContext(step=0, total_steps=10)  # dead=None: no AuxK, variance 1
    out = sae.training_step(x, ctx)
    out.loss.backward()
    sparse = grads(sae)
    assert set(sparse) >= {"W_enc", "b_enc", "W_dec", "b_dec"}

    select = out.codes.dense(sae.cfg.d_sae) > 0
    if arch == "topk":
        assert (select.sum(-1) == sae.cfg.k).all()
    sae.zero_grad(set_to_none=True)
    ref = dense_reference_loss(sae, x, select.float())
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    ref.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(sparse[name], sae.get_parameter(name).grad, rtol=1e-4, atol=1e-5), name


def test_selected_preacts_flat_and_padded_forms_agree():
    torch.manual_seed(1)
    x_c = torch.randn(5, 8)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    idx = torch.tensor([[1, 4], [0, 19], [4, 7], [2, 3], [5, 6]])
    vals = (x_c[:, None, :] * w[idx].detach()).sum(-1) + b[idx].detach()
    g = torch.randn(5, 2)
    SelectedPreacts.apply(x_c, w, b, idx, vals).backward(g)
    gw, gb = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    offsets = torch.arange(0, 10, 2)
    SelectedPreacts.apply(x_c, w, b, idx.reshape(-1), vals.reshape(-1), offsets).backward(g.reshape(-1))
    assert torch.allclose(w.grad, gw) and torch.allclose(b.grad, gb)


# --- JumpReLU ---------------------------------------------------------------------------------

def test_jumprelu_straight_through_gradients_match_the_rectangle_kernel_formulas():
    eps = 0.05
    theta = torch.tensor([0.10, 0.50, 1.00], requires_grad=True)
    #            inside the window (|z - theta| < eps/2)  | outside          | below, inside
    z = torch.tensor([[0.11, 0.49, 1.30],
                      [0.20, 0.52, 0.99],
                      [0.09, 0.40, 1.024]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.5, -1.0], [0.7, 2.0, 4.0]])
    f = JumpReLUFn.apply(z, theta, eps)
    assert torch.equal(f.detach(), z.detach() * (z.detach() > theta.detach()))
    f.backward(g)
    h = (z > theta).float()
    kernel = ((z - theta).abs() / eps < 0.5).float().detach()
    assert torch.allclose(z.grad, g * h)
    assert torch.allclose(theta.grad, (g * -(theta.detach() / eps) * kernel).sum(0))
    # the kernel really selects some entries and rejects others in this example
    assert kernel.sum() == 6 and kernel[1, 0] == 0 and kernel[0, 2] == 0

    z.grad = theta.grad = None
    l0 = StepFn.apply(z, theta, eps)
    assert torch.equal(l0.detach(), h)
    l0.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))  # no pseudo-gradient to z from the L0 term
    assert torch.allclose(theta.grad, (-(1 / eps) * kernel).sum(0))


def _fit(sae, x: np.ndarray, steps: int, batch: int = 256, lr: float = 3e-3, seed: int = 0):
    """A short training loop doing what trainer.train's train_step does (without its I/O).

    Returns (scale, L0 per step): inputs are scaled to mean norm sqrt(D) as in training."""
    data = torch.from_numpy(x)
    scale = (data.shape[1] ** 0.5) / float(data[:2048].norm(dim=1).mean())
    data = data * scale
    variance = float((data - data.mean(0)).pow(2).sum(-1).mean())
    sae.initialise_from(data[:2048])
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    history = []
    for step in range(steps):
        xb = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        ctx = StepContext(step, steps, since_fired >= sae.cfg.dead_after_tokens, variance)
        out = sae.training_step(xb, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_gradient()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.after_step(ctx)
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        active = out.codes.values > 0
        fired.index_add_(0, out.codes.indices[active], torch.ones_like(out.codes.indices[active]))
        since_fired += batch
        since_fired[fired > 0] = 0
        history.append(float(active.sum(-1).float().mean()))
    return scale, history


@pytest.fixture(scope="module")
def synthetic():
    return superposition_data(40_000, d=32, n_features=128, mean_active=5.0, seed=3)


def test_jumprelu_threshold_moves_and_l0_falls(synthetic):
    """From a given theta_0 = 0.01 (the Gemma Scope-style start) the STE must raise the thresholds
    far enough, within 200 steps, to take L0 from dense to a few latents per token."""
    x, _ = synthetic
    sae = make("jumprelu", d_in=32, d_sae=128, seed=0, jumprelu_init_threshold=0.01, l0_coefficient=0.03,
               jumprelu_topk_warmup=0.0)
    theta0 = sae.threshold.detach().clone()
    _, l0 = _fit(sae, x, steps=200, lr=5e-3)
    theta = sae.threshold.detach()
    assert float(theta0.max()) == pytest.approx(0.01)
    assert float((theta - theta0).mean()) > 20 * 0.01, "thresholds barely moved"
    assert float(theta.std()) > 0.01  # per-latent thresholds, not one shared value
    assert float(theta.min()) > 0
    early, late = np.mean(l0[:10]), np.mean(l0[-20:])
    assert early > 30 and late < 0.2 * early, (early, late)


def test_jumprelu_starts_at_the_batch_topk_threshold_and_the_penalty_sets_l0(synthetic):
    x, _ = synthetic
    ends = {}
    for coefficient in (0.003, 0.05):
        sae = make("jumprelu", d_in=32, d_sae=128, k=8, seed=0, l0_coefficient=coefficient, jumprelu_topk_warmup=0.0)
        _, l0 = _fit(sae, x, steps=100, lr=5e-3)
        assert 6 <= np.mean(l0[:3]) <= 10  # starts near k = 8
        ends[coefficient] = np.mean(l0[-20:])
    assert ends[0.05] < 6 and ends[0.003] > 8, ends


def test_jumprelu_default_penalty_holds_l0_at_k_from_any_start(synthetic):
    """Without l0_coefficient the (L0 / k - 1)^2 penalty pulls L0 to k from above and from below."""
    x, _ = synthetic
    for k, theta0 in ((8, None), (8, 0.01), (3, None)):
        sae = make("jumprelu", d_in=32, d_sae=128, k=k, seed=0, jumprelu_init_threshold=theta0, jumprelu_topk_warmup=0.0)
        _, l0 = _fit(sae, x, steps=300, lr=5e-3)
        assert abs(np.mean(l0[-30:]) - k) <= 0.25 * k, (k, theta0, np.mean(l0[:5]), np.mean(l0[-30:]))


def test_jumprelu_init_threshold_is_used_as_given(synthetic):
    x, _ = synthetic
    sae = make("jumprelu", d_in=32, d_sae=128, k=8, jumprelu_init_threshold=0.37)
    sae.initialise_from(torch.from_numpy(x[:2048]))
    assert torch.all(sae.threshold == 0.37)
    data_dependent = make("jumprelu", d_in=32, d_sae=128, k=8)
    data_dependent.initialise_from(torch.from_numpy(x[:2048]))
    assert not torch.allclose(data_dependent.threshold, torch.full((128,), 0.01))


# --- decoder norm -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_decoder_rows_stay_unit_norm(arch, synthetic):
    x, _ = synthetic
    sae = make(arch, d_in=32, d_sae=128, k=4)
    _fit(sae, x, steps=20)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_remove_parallel_gradient_leaves_gradients_orthogonal_to_each_row():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # works for rows that are not exactly unit norm too
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_gradient()
    g, w = sae.W_dec.grad, sae.W_dec.detach()
    cos = (g * w).sum(-1) / (g.norm(dim=1) * w.norm(dim=1))
    assert cos.abs().max() < 1e-5
    # what went is the parallel part: removed = c * row, and the orthogonal part is untouched
    removed = before - g
    coef = (removed * w).sum(-1, keepdim=True) / w.pow(2).sum(-1, keepdim=True)
    assert torch.allclose(removed, coef * w, atol=1e-5)


def test_relu_sae_keeps_a_free_decoder_norm():
    sae = make("relu")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_gradient()
    assert torch.equal(sae.W_dec.grad, before)


# --- BatchTopK --------------------------------------------------------------------------------

def test_batchtopk_selects_exactly_k_times_n_per_batch():
    sae = make("batchtopk", k=5)
    x = torch.randn(64, 16) * torch.rand(64, 1) * 3  # tokens of very different norms
    out = sae.training_step(x, StepContext(0, 10))
    per_token = out.codes.l0()
    assert int(per_token.sum()) == 5 * 64
    assert per_token.max() > per_token.min()  # a budget per batch, not per token
    # the kept entries are the batch's largest pre-activations
    z = sae.preacts(x).detach().clamp_min(0)
    kept = out.codes.dense(64) > 0
    assert float(z[kept].min()) >= float(z[~kept].max())
    values, _, _, kth = batch_topk_flat(z, 5)
    assert values.numel() == 5 * 64 and float(kth) == pytest.approx(float(z[kept].min()))


def test_batchtopk_fallback_when_one_token_holds_most_of_the_budget():
    z = torch.rand(32, 100) * 0.1
    z[3] += 10  # one token's 100 latents beat everything else
    values, _, offsets, _ = batch_topk_flat(z, 4, per_row=2)
    assert values.numel() == 128
    counts = torch.diff(offsets, append=offsets.new_tensor([128]))
    assert int(counts[3]) == 100


def test_batchtopk_inference_threshold_behaves_as_jumprelu(synthetic):
    x, _ = synthetic
    sae = make("batchtopk", d_in=32, d_sae=128, k=4)
    scale, _ = _fit(sae, x, steps=100)
    theta = float(sae.threshold)
    assert theta > 0
    xb = torch.from_numpy(x[:1024]) * scale
    z = sae.preacts(xb)
    codes = sae.encode(xb).dense(128)
    assert torch.equal(codes, z * (z > theta))
    # the same SAE as a JumpReLU with that threshold on every latent
    jr = build_sae(SAEConfig(d_in=32, d_sae=128, architecture="jumprelu"))
    jr.load_state_dict({**{k: v for k, v in sae.state_dict().items() if k != "threshold"},
                        "threshold": sae.inference_threshold()})
    assert torch.allclose(jr(xb), sae(xb))
    # and the threshold keeps L0 near k on data like the training data
    assert 2 < float((codes > 0).sum(-1).float().mean()) < 8


# --- export round trip ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_and_load_give_the_same_reconstructions_on_raw_inputs(arch, synthetic, tmp_path):
    x, _ = synthetic
    raw = torch.from_numpy(x[:512]) * 7.3 + 2.0  # deliberately far from the normalised scale
    sae = make(arch, d_in=32, d_sae=128, k=4)
    scale, _ = _fit(sae, raw.numpy(), steps=15)
    sae.eval()
    with torch.no_grad():
        expected = sae.decode(sae.encode(raw * scale)) / scale
        assert float((expected - raw).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum()) < 1.0

    tensors = export_tensors(sae, scale)
    assert tensors["W_enc"].shape == (32, 128) and tensors["W_dec"].shape == (128, 32)
    assert ("threshold" in tensors) == (arch in ("jumprelu", "batchtopk", "matryoshka"))

    save_sae(tmp_path / arch, sae, scale, "resid_post.3", "test-model")
    loaded = load_sae(tmp_path / arch)
    assert loaded.architecture == arch and loaded.site == "resid_post.3"
    with torch.no_grad():
        got = loaded.sae(raw)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(raw.abs().max()))


# --- AuxK -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_only_touches_dead_latents(arch):
    sae = make(arch, d_sae=64, aux_k=6)
    x = torch.randn(32, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:20]] = True
    ctx = StepContext(0, 10, dead=dead)
    out = sae.training_step(x, ctx)
    loss_no_aux = sae.training_step(x, StepContext(0, 10, dead=torch.zeros(64, dtype=torch.bool))).loss
    assert out.terms["aux"] > 0 and float(out.loss.detach()) > float(loss_no_aux.detach())

    # the gradient of the auxiliary loss alone lands on dead latents only
    with torch.no_grad():
        z = sae.preacts(x)
        x_hat = out.x_hat.detach()
    sae.zero_grad(set_to_none=True)
    aux, _ = sae.auxk_loss(x, x_hat, z, x - sae.b_dec, ctx)
    aux.backward()
    for name in ("W_enc", "W_dec", "b_enc"):
        g = sae.get_parameter(name).grad
        assert g[~dead].abs().max() == 0, name
        assert g[dead].abs().max() > 0, name

    # without dead latents AuxK does nothing
    zero, _ = sae.auxk_loss(x, x_hat, z, x - sae.b_dec, StepContext(0, 10, dead=torch.zeros(64, dtype=torch.bool)))
    assert float(zero) == 0.0


def test_auxk_loss_is_scaled_by_the_share_of_dead_latents():
    sae = make("topk", d_sae=64, aux_k=8)
    x = torch.randn(32, 16)
    z = sae.preacts(x).detach()
    x_hat = torch.zeros_like(x)
    few = torch.zeros(64, dtype=torch.bool)
    few[:2] = True
    loss, terms = sae.auxk_loss(x, x_hat, z, x - sae.b_dec, StepContext(0, 1, dead=few))
    assert float(loss.detach()) == pytest.approx(sae.cfg.aux_coefficient * (2 / 8) * terms["aux"], rel=1e-5)


# --- JumpReLU thresholds in the real trainer ---------------------------------------------------

def _jumprelu_short_run(path, out, **settings):
    """40 steps of 512 rows through the trainer, under bfloat16 autocast, from theta_0 = 0.5, thresholds
    learning from the first step (no TopK warm-up, whose calibration would move them without learning)."""
    from trainer.train import TrainConfig, Trainer

    cfg = TrainConfig(out=out, activations=path, site=["resid_post.0"], arch=["jumprelu"], width=[64], k=[4],
                      tokens=40 * 512, batch_size=512, device="cpu", ce_contexts=0, checkpoint_every=0,
                      autocast="bfloat16", log_every=1000, eval_tokens=2048, jumprelu_init_threshold=0.5,
                      jumprelu_topk_warmup=0.0, **settings)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.runs[0]


def test_jumprelu_thresholds_learn_in_float32_under_bfloat16_autocast(tmp_path):
    """SAELens #718/#728: a threshold kept in bfloat16 (or one the optimiser never steps) barely moves
    in a short run. Through the trainer under bfloat16 autocast, the thresholds must stay float32 (with
    float32 Adam moments) and move: measured mean |theta - theta_0| after these 40 steps 0.28-0.32
    (seeds 0-2); the bound is a third of that. The same run with the thresholds frozen
    (jumprelu_threshold_lr_scale = 0) moves them by exactly 0, so the measure tells the two apart."""
    x, _ = superposition_data(30_000, d=32, n_features=128, mean_active=5.0, seed=3)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    run = _jumprelu_short_run(path, tmp_path / "learns")
    theta = run.sae.threshold
    assert run.sae.compute_dtype == torch.bfloat16
    assert theta.dtype == torch.float32 and run.optimizer.state[theta]["exp_avg"].dtype == torch.float32
    moved = float((theta.detach() - 0.5).abs().mean())
    assert moved > 0.1, f"thresholds moved by {moved:.4f} on average in 40 steps"
    frozen = _jumprelu_short_run(path, tmp_path / "frozen", jumprelu_threshold_lr_scale=0.0)
    assert float((frozen.sae.threshold.detach() - 0.5).abs().max()) == 0.0


def test_jumprelu_topk_warmup_selects_k_per_token_then_calibrates_each_threshold(synthetic):
    """During the warm-up every token keeps its k largest pre-activations (as a TopK SAE); where it
    ends, each latent's threshold makes it fire on that batch exactly as often as TopK chose it."""
    x, _ = synthetic
    sae = make("jumprelu", d_in=32, d_sae=128, k=6, jumprelu_topk_warmup=0.5)
    xb = torch.from_numpy(x[:512])
    sae.initialise_from(xb)
    with torch.no_grad():
        z = sae.preacts(xb)
    out = sae.training_step(xb, StepContext(step=4, total_steps=10))  # warm-up: steps 0-4
    active = (out.codes.values > 0).sum(-1)
    assert torch.equal(active, (z > 0).sum(-1).clamp(max=6))
    chosen = torch.zeros_like(z).scatter_(1, z.topk(6, dim=-1).indices, 1.0) * (z > 0)
    assert torch.allclose(out.codes.dense(128), z * chosen)
    out.loss.backward()
    assert sae.threshold.grad is None and sae.W_enc.grad is not None  # the thresholds wait for the switch
    sae.training_step(xb, StepContext(step=5, total_steps=10))  # the first threshold step calibrates
    fires = (z > sae.threshold).sum(0)
    selected = chosen.sum(0)
    assert torch.equal(fires[selected > 0], selected[selected > 0].to(fires.dtype))


def test_jumprelu_per_token_penalty_is_the_mean_of_each_tokens_quadratic():
    sae = make("jumprelu", d_in=16, d_sae=64, k=4, jumprelu_l0_per_token=True, target_l0_coefficient=2.0)
    l0 = torch.tensor([2.0, 4.0, 10.0])
    # 2 * mean((2/4 - 1)^2, 0, (10/4 - 1)^2) = 2 * (0.25 + 0 + 2.25) / 3
    assert float(sae.sparsity_penalty(l0)) == pytest.approx(2 * 2.5 / 3)
    batch = make("jumprelu", d_in=16, d_sae=64, k=4, target_l0_coefficient=2.0)
    assert float(batch.sparsity_penalty(l0)) == pytest.approx(2 * (16 / 3 / 4 - 1) ** 2)


def test_matryoshka_topk_warmup_selects_per_token_then_per_batch(synthetic):
    x, _ = synthetic
    sae = make("matryoshka", d_in=32, d_sae=128, k=5, matryoshka_topk_warmup=0.3)
    xb = torch.from_numpy(x[:256])
    with torch.no_grad():
        z = sae.preacts(xb)
    warm = sae.training_step(xb, StepContext(step=2, total_steps=10))  # steps 0-2 select per token
    per_token = (warm.codes.values > 0).sum(-1)
    assert torch.equal(per_token, (z > 0).sum(-1).clamp(max=5))
    late = sae.training_step(xb, StepContext(step=3, total_steps=10))
    counts = (late.codes.values > 0).sum(-1)
    assert int(counts.sum()) == 5 * 256 and int(counts.max()) > 5  # k x N over the batch, unevenly
