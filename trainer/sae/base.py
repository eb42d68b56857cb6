"""The shared base of every SAE architecture: parameters, sparse codes, and the sparse kernels.

Layout: W_enc and W_dec are both [d_sae, d_in] (one row per latent), so a latent's encoder and
decoder vectors are contiguous rows; the SAELens layout (W_enc [d_in, d_sae]) is produced only on
export (trainer.formats).

The TopK family trains through sparse kernels: the encoder is computed densely without autograd
to *select* latents, then only the selected pre-activations carry gradients (SelectedPreacts),
and decoding is an embedding bag over the selected rows. Backward therefore touches k rows per
token instead of d_sae, which is what makes CPU training several times faster than dense autograd.
BatchTopK keeps a varying number of latents per token and passes the selection flat, with offsets.

Initialisation: W_dec rows are random unit directions, W_enc = W_dec (the transpose in the SAELens
layout), b_enc = 0; initialise_from then puts b_dec at the geometric median of the first batch and,
for the TopK family (and JumpReLU), fits one scale for W_enc to that batch (fit_encoder_scale).

Transcoders in training (cfg.transcode): the SAE reads x (an MLP's input) and is scored against a
target y (its output, StepContext.target). As sparsify's SparseCoder with transcode=True: the
encoder leaves b_dec out (SparseCoder.encode), W_dec and the skip term W_skip start at zero
(SparseCoder.__init__), the decoder has no norm constraint (its Trainer neither normalises nor
projects W_dec when transcoding), and the first batch sets b_enc = -mean(x) W_enc^T and b_dec =
mean(y) (the hook in sparsify's Trainer.fit). A skip-transcoder's W_skip x is added by `io`
(SkipConnection), so output() stays the one home of the prediction. trainer.transcoders turns a
trained transcoder into the standard form (b_dec subtracted, scales folded) that every reader of
a saved transcoder uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from store.errors import AtlasError
from trainer.sae.schedule import LONG_RUN_STEPS, dead_window, default_lr, lr_for_width  # noqa: F401  (re-exported)


@dataclass
class SAEConfig:
    """Architecture and loss settings of one SAE (stored in cfg.json under sae_atlas.sae)."""

    d_in: int
    """Width of the activations the SAE reads (the LM's d_model for residual sites)."""
    d_sae: int
    """Number of latents (the dictionary size, typically 8-64 x d_in)."""
    architecture: str = "topk"
    """topk, batchtopk, jumprelu, relu or matryoshka."""
    k: int = 32
    """TopK family: latents kept per token (BatchTopK: on average)."""
    aux_k: int | None = None
    """AuxK: dead latents used to model the residual; None means d_in // 2."""
    aux_coefficient: float = 1 / 32
    """AuxK: weight alpha of the auxiliary loss."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead; the trainer sets it
    from the run (dead_window)."""
    l1_coefficient: float = 0.2
    """ReLU: lambda of the decoder-norm-weighted L1 penalty, lambda * sum_i f_i ||W_dec,i|| / sqrt(variance)
    next to the squared error / variance: a latent is worth using only where its contribution exceeds
    about lambda/2 of the RMS input norm. 0.2 matches Anthropic's lambda = 5 at d_model ~ 600 and gives
    L0 in the tens; 2.0 switched every latent off (FVU 1)."""
    l1_warmup_frac: float = 0.05
    """ReLU: lambda rises linearly from 0 over this fraction of the steps."""
    l0_coefficient: float | None = None
    """JumpReLU: lambda of the Gemma Scope penalty lambda * L0, in units of the input variance (the
    fraction of the variance one active latent must explain to be worth its cost). None: aim L0 at k
    instead, with the penalty target_l0_coefficient * (L0 / k - 1)^2, so that a JumpReLU SAE's L0
    matches the TopK family's at the same k."""
    target_l0_coefficient: float = 1.0
    """JumpReLU without l0_coefficient: weight of the (L0 / k - 1)^2 penalty."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: epsilon, the width of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: float | None = None
    """JumpReLU: theta_0, the initial threshold of every latent (parameterised directly). None: start
    where a BatchTopK SAE with this k would on the first batch (encoder scale fitted, every threshold
    at the smallest pre-activation that batch selection keeps), so the initial L0 is about k."""
    jumprelu_threshold_lr_scale: float = 1.0
    """JumpReLU: the thresholds' learning rate as a multiple of the run's (they are their own Adam
    parameter group, kept in float32 whatever the compute dtype); 0 freezes them at their start."""
    jumprelu_l0_per_token: bool = False
    """JumpReLU without l0_coefficient: apply the target-L0 penalty to every token's L0, the mean of
    c * (L0_t / k - 1)^2 (Gemma Scope 2's quadratic form), instead of to the batch's mean L0."""
    jumprelu_topk_warmup: float = 0.8
    """JumpReLU: the fraction of the run trained with per-token TopK selection (the k largest
    pre-activations of each token, as a TopK SAE) before the thresholds take over; at the switch each
    latent's threshold is set so that it fires on that batch as often as TopK selected it, and the
    thresholds learn from there (the last fifth of the default schedule, its learning-rate decay).
    0: JumpReLU from the first step. Measured on the synthetic grid's report half (0.5 M tokens,
    seed 1; BENCHMARKS.md): mmcs rose in every one of the 8 shapes (median 0.874 -> 0.970, TopK
    0.986) and the median dead share fell from 65% to 28%; on SmolLM2-135M resid_post.15 (width 1152,
    k 32, 250 k tokens) held-out FVU 0.243 at L0 21 -> 0.217 at L0 32 (TopK 0.220)."""
    matryoshka_topk_warmup: float = 0.0
    """Matryoshka: the fraction of the run trained with per-token TopK selection (the k largest
    pre-activations of each token) before BatchTopK's batch-wide selection (Bussmann et al.) takes
    over; 1 trains with TopK's selection throughout, 0 (the default) with BatchTopK's from the first
    step. Inference is BatchTopK's global threshold either way (an EMA of the batch's k x N-th largest
    pre-activation, so the L0 at inference is about k). Measured (BENCHMARKS.md): 0.8 raised the
    synthetic grid's mmcs in every cell of the report half (median 0.840 -> 0.933) but held-out FVU on
    SmolLM2-135M rose slightly (resid_post.15: 0.23566 -> 0.23571 and, seed 1, 0.2358 -> 0.2364;
    resid_post.14: 0.2379 -> 0.2387), so it is not the default. Throughout (1.0) the mmcs rose further
    on the tune half but the synthetic FVU rose from 0.18 to 0.24."""
    matryoshka_prefixes: list[int] = field(default_factory=list)
    """Matryoshka: nested dictionary sizes that must each reconstruct x; empty means d_sae/4, d_sae/2, d_sae."""
    threshold_momentum: float = 0.99
    """BatchTopK: EMA momentum of the global inference threshold (lowered for runs under 1000 steps,
    so that the EMA spans at most a tenth of the run)."""
    transcode: bool = False
    """Training a transcoder: the encoder leaves b_dec out, W_dec starts at zero and is not kept at unit
    norm, and the loss is against StepContext.target (sparsify's transcode). Saved transcoders are in
    the standard form and have it false (trainer.transcoders.finished_transcoder)."""
    skip_connection: bool = False
    """Training a skip-transcoder: a learned W_skip x (d_in x d_in, starting at zero) is added to the
    prediction (sparsify's skip_connection); saved, it is sae.io's W_skip."""

    def __post_init__(self):
        from trainer.config import ARCHITECTURES, TOPK_FAMILY

        if self.architecture not in ARCHITECTURES:
            raise AtlasError(f"unknown architecture {self.architecture!r}", f"use one of {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise AtlasError(f"SAE sizes must be positive (d_in={self.d_in}, width={self.d_sae})")
        # The TopK family's encoder needs k; JumpReLU's training reads it too (its L0 target and
        # initial thresholds), which TrainConfig checks, but a loaded JumpReLU SAE does not.
        if self.architecture in TOPK_FAMILY and not 0 < self.k < self.d_sae:
            raise AtlasError(f"k={self.k} must be between 1 and width-1 ({self.d_sae - 1})", "lower --k or raise --width")
        for name in ("aux_coefficient", "l1_coefficient", "target_l0_coefficient", "jumprelu_bandwidth"):
            if not getattr(self, name) >= 0:
                raise AtlasError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.jumprelu_threshold_lr_scale >= 0:
            raise AtlasError(f"jumprelu_threshold_lr_scale must not be negative, got {self.jumprelu_threshold_lr_scale}")
        if not 0 <= self.jumprelu_topk_warmup < 1:
            raise AtlasError(f"jumprelu_topk_warmup is a fraction of the run below 1, got {self.jumprelu_topk_warmup}",
                             "the thresholds are set where the warm-up ends, so some of the run must remain")
        if not 0 <= self.matryoshka_topk_warmup <= 1:
            raise AtlasError(f"matryoshka_topk_warmup is a fraction of the run, got {self.matryoshka_topk_warmup}")
        for name in ("l0_coefficient", "jumprelu_init_threshold"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise AtlasError(f"{name} must be positive, got {getattr(self, name)}", "leave it unset for the default")
        if self.dead_after_tokens <= 0:
            raise AtlasError(f"dead_after_tokens must be positive, got {self.dead_after_tokens}")
        if self.skip_connection and not self.transcode:
            raise AtlasError("a skip connection is for transcoders", "train a transcoder (site mlp.L) or drop --skip-connection")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_in // 2, self.d_sae))
        if self.architecture == "matryoshka":
            if not self.matryoshka_prefixes:
                # Three levels, a quarter, a half and all of the dictionary. Smaller first levels must
                # reconstruct x with a handful of latents, which they do with blends of features: on
                # the synthetic CI problem (128 true directions, width 256) mmcs was 0.83 with six
                # levels from width/32, 0.87 from width/8 and 0.90 from width/4.
                self.matryoshka_prefixes = sorted({max(self.k + 1, self.d_sae >> s) for s in (2, 1, 0)})
            prefixes = sorted({int(p) for p in self.matryoshka_prefixes} | {self.d_sae})
            if prefixes[0] <= 0 or prefixes[-1] > self.d_sae:
                raise AtlasError(f"matryoshka prefixes {self.matryoshka_prefixes} must lie in 1..{self.d_sae}")
            self.matryoshka_prefixes = prefixes

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Codes:
    """Sparse latent activations, padded to the same count per token (padding has value 0)."""

    values: torch.Tensor  # [N, K] float
    indices: torch.Tensor  # [N, K] long

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        return (self.values > 0).sum(-1).float()


@dataclass
class StepContext:
    """What a training step needs to know beyond the batch."""

    step: int
    total_steps: int
    dead: torch.Tensor | None = None  # bool [d_sae]: latents dead for dead_after_tokens
    variance: float = 1.0  # E||y - mean||^2 of the normalised target (x itself for an SAE), fixed at init
    target: torch.Tensor | None = None  # a transcoder's target y (normalised output site); None: x


@dataclass
class StepOutput:
    loss: torch.Tensor
    x_hat: torch.Tensor
    codes: Codes
    terms: dict[str, float]


FIRING_FLOOR = 1e-4
"""A latent fires on a token when f_i * ||W_dec,i|| exceeds this fraction of the mean input norm. A
latent whose every contribution is below it changes the squared error by under 1e-8 of the input's
energy; a working latent's contributions are 1e-2 to 1 of the norm."""


class SelectedPreacts(torch.autograd.Function):
    """Pre-activations of selected latents, with gradients that touch only the selected rows.

    forward returns `values` (already computed densely without autograd); backward gives
    x_c: sum_j g[n,j] W[idx[n,j]], W[idx[n,j]] += g[n,j] x_c[n], b[idx[n,j]] += g[n,j].

    The selection is either padded, indices [N, K] (TopK: the same count per token), or flat,
    indices [M] with `offsets` [N] where token n owns indices[offsets[n]:offsets[n+1]] (BatchTopK:
    a varying count per token; padding every token to the largest count would make the backward
    pass as costly as that count times N).
    """

    @staticmethod
    def forward(ctx, x_c, weight, bias, indices, values, offsets=None):
        ctx.save_for_backward(x_c, weight, indices, offsets)
        ctx.bias_shape = bias.shape
        return values

    @staticmethod
    def backward(ctx, grad):
        x_c, weight, indices, offsets = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = F.embedding_bag(indices, weight, offsets, per_sample_weights=grad, mode="sum")
        with torch.enable_grad():
            table = weight.detach().requires_grad_()
            out = F.embedding_bag(indices, table, offsets, per_sample_weights=grad.detach(), mode="sum")
            (grad_w,) = torch.autograd.grad(out, table, x_c.to(weight.dtype))
        grad_b = torch.zeros(ctx.bias_shape, dtype=weight.dtype, device=weight.device)
        grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to `points` [N, D]."""
    points = points.float()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, median.norm().item()):
            return new
        median = new
    return median


class SparseAutoencoder(nn.Module):
    """Base class: parameters, initialisation, sparse encode/decode, decoder-norm maintenance."""

    architecture: str = ""
    unit_norm_decoder: bool = True
    sparse_training: bool = False  # TopK family: selection + SelectedPreacts + embedding bag

    def __init__(self, cfg: SAEConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype  # dtype of the dense encoder matmul (bf16 autocast)
        d_in, d_sae = cfg.d_in, cfg.d_sae
        directions = torch.randn(d_sae, d_in)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(directions * self.initial_decoder_norm())
        self.W_enc = nn.Parameter(directions.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # What happens around encode/decode: set by trainer.formats on SAEs read from other tools
        # (SAELens's run-time input normalisation, a skip-transcoder's W_skip x) and, in training,
        # to a skip-transcoder's SkipConnection. Duck-typed: normalise(x) before the encoder,
        # finish(x_hat, x) after the decoder, output_scale(x).
        self.io: nn.Module | None = None
        if cfg.transcode:
            # As sparsify's SparseCoder.__init__ with transcode: the encoder is nn.Linear's default
            # initialisation (rows uniform in +-1/sqrt(d_in)) and the decoder starts at zero.
            with torch.no_grad():
                bound = 1 / math.sqrt(d_in)
                self.W_enc.uniform_(-bound, bound)
                self.W_dec.zero_()
            self.unit_norm_decoder = False
            if cfg.skip_connection:
                self.io = SkipConnection(d_in)

    def initial_decoder_norm(self) -> float:
        return 1.0

    # --- inference -------------------------------------------------------------------------------

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """z = W_enc (x - b_dec) + b_enc (a transcoder in training: W_enc x + b_enc), the dense matmul
        done in compute_dtype."""
        if self.io is not None:
            x = self.io.normalise(x)
        x_c = self.encoder_input(x.to(self.W_enc.dtype))
        if self.compute_dtype != self.W_enc.dtype:
            z = x_c.to(self.compute_dtype) @ self.W_enc.to(self.compute_dtype).T
            return z.to(self.W_enc.dtype) + self.b_enc
        return torch.addmm(self.b_enc, x_c, self.W_enc.T)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder matrix multiplies: x - b_dec, or x for a transcoder in training (as
        sparsify's SparseCoder.encode, which subtracts b_dec only when not transcoding: b_dec lives
        at the output site)."""
        return x if self.cfg.transcode else x - self.b_dec

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latent activations from pre-activations (inference semantics)."""
        raise NotImplementedError

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.preacts(x))

    def encode(self, x: torch.Tensor) -> Codes:
        """Sparse codes, padded to the largest count of active latents in the batch."""
        return dense_to_codes(self.encode_dense(x))

    def decode(self, codes: Codes) -> torch.Tensor:
        return F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values.to(self.W_dec.dtype),
                               mode="sum") + self.b_dec

    def output(self, codes: Codes, x: torch.Tensor) -> torch.Tensor:
        """What the SAE predicts for input x, given codes = encode(x): decode(codes), plus what an
        imported SAE adds after its decoder (see `io`). The one home of x_hat: every error x - x_hat
        (evaluation, dark matter, relate) comes from here, never from decode(), which ignores `io`."""
        return self.finish(self.decode(codes), x)

    def finish(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction from the decoder's output x_hat and the input x: what `io` adds (a skip
        term, an undone normalisation). output() and every training step go through here."""
        return x_hat if self.io is None else self.io.finish(x_hat, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.encode(x), x)

    def output_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """[n, 1]: what one unit of decode()'s output is worth in output(), per token (an imported
        SAE's undone input normalisation), or None for 1. Latent i adds f_i * W_dec,i times this."""
        return None if self.io is None else self.io.output_scale(x)

    def output_delta(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The change of output(codes, x) that a change `delta` of the decoder output (e.g. latent
        activations times W_dec rows, in the SAE's normalised units) makes: the de-normalisation of
        `io` scales the decoder output per token of x, and the rest of output() does not depend on it."""
        scale = self.output_scale(x)
        return delta if scale is None else delta * scale

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    # --- training --------------------------------------------------------------------------------

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups; each group's lr_scale multiplies the run's learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    @staticmethod
    def target(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """What the prediction is scored against: x, or a transcoder's target (its output site)."""
        return x if ctx.target is None else ctx.target

    def recon_loss(self, x: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Squared error per token against the target, in units of its variance (an FVU estimate;
        sparsify's loss for transcoders is the FVU of the output site)."""
        return (x_hat - self.target(x, ctx)).pow(2).sum(-1).mean() / ctx.variance

    def select_train(self, x: torch.Tensor, indices_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute z without autograd, choose latents with indices_fn(z) -> (values, indices, mask),
        then give the chosen pre-activations their gradients. Returns (acts, indices, z, x_c)."""
        x_c = self.encoder_input(x)
        with torch.no_grad():
            z = self.preacts(x)
            values, indices, mask = indices_fn(z)
        pre = SelectedPreacts.apply(x_c, self.W_enc, self.b_enc, indices, values)
        acts = F.relu(pre) * mask
        return acts, indices, z, x_c

    def decode_sparse(self, acts: torch.Tensor, indices: torch.Tensor, bias: bool = True,
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat from selected activations: padded [N, K] indices, or flat [M] ones with offsets [N]."""
        out = F.embedding_bag(indices, self.W_dec, offsets, per_sample_weights=acts, mode="sum")
        return out + self.b_dec if bias else out

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, x_c: torch.Tensor,
                  ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """AuxK (Gao et al. 2024): dead latents learn to model the residual the live ones leave."""
        if ctx.dead is None:
            return x.new_zeros(()), {}
        n_dead = int(ctx.dead.sum())
        if n_dead == 0:
            return x.new_zeros(()), {"aux": 0.0}
        k_aux = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            values, indices = z.masked_fill(~ctx.dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        pre = SelectedPreacts.apply(x_c, self.W_enc, self.b_enc, indices, values)
        e_hat = self.decode_sparse(F.relu(pre), indices, bias=False)
        e = (self.target(x, ctx) - x_hat).detach()
        aux = (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        scale = min(n_dead / self.cfg.aux_k, 1.0)
        return self.cfg.aux_coefficient * scale * aux, {"aux": float(aux.detach())}

    @torch.no_grad()
    def fires(self, codes: Codes, input_norm: float | None = None) -> torch.Tensor:
        """[N, K] bool: which entries of the codes count as their latent firing, by the same rule for
        every architecture: the latent's contribution to the reconstruction, f_i * ||W_dec,i||, exceeds
        FIRING_FLOOR of the mean input norm (`input_norm`, in the units the SAE reads; default
        sqrt(d_in), the mean norm of the trainer's normalised inputs). Why not f_i > 0: a ReLU SAE
        whose L1 penalty is too strong shrinks its decoder rows to ~1e-5 while every f_i stays
        positive; it reconstructs nothing (FVU 1) and must not count as alive."""
        values = codes.values.float() * self.decoder_norms().detach().float()[codes.indices]
        return values > FIRING_FLOOR * (input_norm if input_norm is not None else math.sqrt(self.cfg.d_in))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Keep only the part of each decoder row's gradient that does not change its norm."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w = self.W_dec
        w.grad -= (w.grad * w).sum(-1, keepdim=True) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self.normalise_decoder()

    # --- export ----------------------------------------------------------------------------------

    def inference_threshold(self) -> torch.Tensor | None:
        """Per-latent thresholds for a JumpReLU-style export, or None."""
        return None

    @torch.no_grad()
    def initialise_from(self, sample: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation from a first batch of (normalised) inputs: b_dec at their
        geometric median, then (TopK family) the encoder scale fitted to them, see fit_encoder_scale.
        A transcoder (with `target`, the same tokens' normalised output site) starts as sparsify's
        Trainer.fit starts one on its first step: b_enc = -mean(x) W_enc^T, so that pre-activations
        are centred, and b_dec = mean(y)."""
        sample = sample[:4096].float()
        if self.cfg.transcode:
            if target is None:
                raise ValueError("a transcoder is initialised from its input and its target")
            self.b_enc.copy_(-(sample.mean(0) @ self.W_enc.T).to(self.b_enc))
            self.b_dec.copy_(target[:4096].float().mean(0).to(self.b_dec))
            return
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec))
        if self.sparse_training:
            self.fit_encoder_scale(sample)

    def initial_selection(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x - b_dec by the latents the training rule selects (TopK family)."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_encoder_scale(self, sample: torch.Tensor) -> float:
        """Scale W_enc (= W_dec^T at init) by the s that minimises ||(x - b_dec) - s * y||^2 over the
        sample, where y is the initial reconstruction with unit encoder rows. Returns s.

        With b_enc = 0 the TopK and BatchTopK selections do not depend on s, so s is the exact least
        squares optimum. Why: with W_enc = W_dec^T the first reconstructions overshoot (initial FVU
        0.9 for TopK and 2.5 for BatchTopK on the quick synthetic problem, where high-norm tokens take
        many latents); the first steps then shrink every selected encoder row and push b_enc down,
        and latents that lose that race stay quiet. This is our choice of the initial encoder scale
        (typically s ~ 0.3-0.8); the references fix it instead (W_enc = W_dec^T in Gao et al. and
        SAELens, nn.Linear's init in sparsify, about 0.58x). Measured effect at equal tokens:
        synthetic mmcs TopK 0.953 -> 0.979, BatchTopK 0.765 -> 0.855 (1M tokens, d=32); held-out
        FVU on SmolLM2 resid_post.15 (400k tokens, width 1152, k=32) TopK 0.246 -> 0.240,
        BatchTopK 0.254 -> 0.243.
        """
        y = self.initial_selection(sample)
        x_c = sample - self.b_dec
        denom = float(y.pow(2).sum())
        if not math.isfinite(denom) or denom <= 0:
            return 1.0
        s = float((x_c * y).sum()) / denom
        if not 0 < s < float("inf"):
            return 1.0
        s = min(max(s, 0.05), 2.0)
        self.W_enc.mul_(s)
        return s


class SkipConnection(nn.Module):
    """A skip-transcoder's linear term in training: finish(x_hat, x) = x_hat + x W_skip^T, with
    W_skip [d_in, d_in] a parameter starting at zero (sparsify's SparseCoder: W_skip zeros,
    `sae_out += x @ W_skip.mT`, x the raw input, not x - b_dec). The `io` duck type of
    SparseAutoencoder; a saved skip-transcoder carries W_skip in trainer.formats' SiteIO."""

    input_norm = "none"

    def __init__(self, d_in: int):
        super().__init__()
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def output_scale(self, x: torch.Tensor) -> None:
        return None

    def finish(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x_hat + x.to(x_hat.dtype) @ self.W_skip.to(x_hat.dtype).T


def dense_to_codes(f: torch.Tensor) -> Codes:
    """Dense non-negative activations [N, F] to padded sparse codes."""
    k = int((f > 0).sum(-1).max().item()) if f.numel() else 0
    k = max(k, 1)
    values, indices = f.topk(k, dim=-1, sorted=False)
    return Codes(values.clamp_min(0), indices)
