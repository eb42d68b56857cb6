"""What a training run is asked to do: TrainConfig, a dataclass whose fields are the CLI flags and
the TOML keys. Torch-free, so that validating a run (the API, the run form, `--submit`) does not
load torch."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from store.errors import AtlasError

if TYPE_CHECKING:
    from trainer.sae import SAEConfig

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
USES_K = (*TOPK_FAMILY, "jumprelu")  # JumpReLU aims its L0 at k
# TrainConfig fields passed to SAEConfig only when set (SAEConfig holds their defaults).
ARCH_SETTINGS = ("aux_k", "aux_coefficient", "l1_coefficient", "l0_coefficient", "jumprelu_bandwidth",
                 "jumprelu_init_threshold", "jumprelu_threshold_lr_scale", "jumprelu_l0_per_token",
                 "jumprelu_topk_warmup", "matryoshka_topk_warmup", "matryoshka_prefixes")


@dataclass
class TrainConfig:
    """One training run (a single SAE or a sweep). CLI flags and TOML keys have the same names."""

    out: Path = Path("runs/sae")
    """Output folder: the SAE itself, or one sub-folder per SAE of a sweep."""
    model: str = "smollm2-135m"
    """LM: alias, local folder, .gguf file or Hugging Face id."""
    site: list[str] = field(default_factory=lambda: ["resid_post.15"])
    """Activation sites; several give a sweep over sites from one LM pass. mlp.L trains a transcoder
    of block L's MLP (reads mlp_in.L, predicts mlp_out.L); mlp.* every block's, mlp.A-B blocks A to B,
    all from the same LM pass."""
    arch: list[str] = field(default_factory=lambda: ["topk"])
    """Architectures: topk, batchtopk, jumprelu, relu, matryoshka."""
    width: list[int] = field(default_factory=lambda: [4608])
    """Numbers of latents (d_sae)."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active latents per token for the TopK family; the L0 JumpReLU aims at."""
    tokens: int = 2_000_000
    """Training tokens per SAE (the stream repeats the corpus if it is shorter)."""
    activations: Path | None = None
    """Train on a saved float32 [N, D] .npy matrix instead of running an LM."""
    corpus: str = "pydoc"
    """pydoc, a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."""
    text_field: str = "text"
    """Field/column holding the text in .jsonl, .parquet and HF corpora."""
    ctx_len: int = 128
    """Tokens per context, BOS included."""
    eval_fraction: float = 0.1
    """Share of documents held out for evaluation and analysis."""
    seed: int = 0
    """Seed for initialisation, document order and shuffling."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate; None: trainer/sae/base.py default_lr (Gao et al.'s width law, raised for runs
    under 16k steps)."""
    warmup_steps: int = 1000
    """Linear warm-up steps (at most a tenth of the run)."""
    decay_frac: float = 0.2
    """The learning rate decays linearly to 0 over this last fraction of the steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping per SAE; 0 disables it."""
    # Architecture settings: None (or empty) means the default of trainer/sae/base.py SAEConfig, their
    # one home, so that the CLI, TOML files, the run form and the runs API train the same SAE.
    aux_k: int | None = None
    """AuxK latents; None: SAEConfig's default (d_in / 2)."""
    aux_coefficient: float | None = None
    """AuxK loss weight alpha; None: SAEConfig's default (1/32)."""
    dead_after_tokens: int | None = None
    """Tokens without firing after which a latent is dead; None: trainer/sae/base.py dead_window
    (5% of the run within [10k, 10M]; BatchTopK and Matryoshka: 5 batches, at least 20k)."""
    l1_coefficient: float | None = None
    """ReLU SAEs: L1 lambda; None: SAEConfig's default."""
    l0_coefficient: float | None = None
    """JumpReLU SAEs: Gemma Scope's L0 lambda; None: aim L0 at k (SAEConfig.target_l0_coefficient)."""
    jumprelu_bandwidth: float | None = None
    """JumpReLU SAEs: STE bandwidth epsilon; None: SAEConfig's default (0.05)."""
    jumprelu_init_threshold: float | None = None
    """JumpReLU SAEs: initial threshold theta_0 of every latent; None: data-dependent (initial L0 about k)."""
    jumprelu_threshold_lr_scale: float | None = None
    """JumpReLU SAEs: the thresholds' learning rate as a multiple of --lr; None: SAEConfig's default."""
    jumprelu_l0_per_token: bool | None = None
    """JumpReLU SAEs: target-L0 penalty per token instead of on the batch mean; None: SAEConfig's default."""
    jumprelu_topk_warmup: float | None = None
    """JumpReLU SAEs: fraction of the run trained with per-token TopK selection; None: SAEConfig's default."""
    matryoshka_topk_warmup: float | None = None
    """Matryoshka SAEs: fraction of the run trained with per-token TopK selection before BatchTopK's;
    None: SAEConfig's default."""
    matryoshka_prefixes: list[int] = field(default_factory=list)
    """Matryoshka SAEs: nested dictionary sizes (default: SAEConfig's, width/4, width/2, width)."""
    skip_connection: bool = False
    """Transcoders (mlp.L sites): add a learned linear skip term W_skip x (d_model x d_model, starting at
    zero) to the prediction, a skip-transcoder (sparsify's skip_connection)."""
    exclude_bos: bool = True
    """Leave the BOS position out of training data and evaluation."""
    sink_norm_ratio: float | None = 10.0
    """Leave out tokens whose activation norm exceeds this multiple of the median (attention sinks)."""
    shuffle_buffer: int = 1 << 18
    """Tokens mixed together by the shuffle buffer."""
    shuffle_buffer_mb: int = 4096
    """Most memory the shuffle buffer holds, every site together: a run over many sites (the 60 of a
    30-block transcoder run) mixes fewer than shuffle_buffer tokens."""
    cache_activations: bool = False
    """Store one pass of LM activations on disk (DATA_DIR/activations) and train from it."""
    lm_batch_size: int = 32
    """Contexts per LM forward pass."""
    lm_dtype: str = "auto"
    """LM precision: auto, float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    autocast: str = "auto"
    """SAE encoder matmul precision: auto (bfloat16 on CUDA, and for transcoders on CPUs with native
    bfloat16 matmuls), bfloat16, float32."""
    eval_tokens: int = 65_536
    """Held-out tokens for the reconstruction metrics."""
    ce_contexts: int = 512
    """Most held-out contexts for the spliced-in LM loss (0 skips it); it stops earlier, after at least
    32, once the 95% intervals of CE recovered and delta LM loss are within ce_ci_target."""
    ce_each: bool = True
    """With ce_contexts > 0: also splice each SAE in alone for its own CE (one LM pass per SAE and
    batch of contexts); off, a multi-block transcoder run measures only each whole set's CE."""
    ce_ci_target: float = 0.005
    """Half-width wanted for the 95% intervals: CE recovered +-0.005 (0.5 points), delta LM loss
    +-0.5% of the clean loss."""
    log_every: int = 25
    """Steps between JSON-lines log records."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end and on Ctrl-C)."""
    checkpoint_every_s: float = 0.0
    """Also checkpoint when this many seconds have passed since the last one (0: off)."""
    resume: bool = False
    """Continue from the checkpoint in `out`."""
    overwrite: bool = False
    """Replace whatever is in `out`."""

    def validate(self) -> None:
        def bad(msg, hint=None):
            raise AtlasError(msg, hint)

        for a in self.arch:
            if a not in ARCHITECTURES:
                bad(f"unknown architecture {a!r}", f"use one of {', '.join(ARCHITECTURES)}")
        if any(w <= 0 for w in self.width):
            bad(f"width must be positive, got {self.width}")
        if any(k <= 0 for k in self.k):
            bad(f"k must be positive, got {self.k}")
        if any(a in USES_K for a in self.arch):
            for w, k in itertools.product(self.width, self.k):
                if k >= w:
                    bad(f"k={k} must be smaller than width={w}", "lower --k or raise --width")
        if self.tokens < self.batch_size:
            bad(f"--tokens {self.tokens} is less than one batch of {self.batch_size}", "raise --tokens or lower --batch-size")
        if self.batch_size <= 0 or self.ctx_len < 4 or self.lm_batch_size <= 0:
            bad("batch sizes must be positive and ctx_len at least 4")
        if not 0 <= self.eval_fraction < 1:
            bad(f"eval_fraction {self.eval_fraction} must be in [0, 1)")
        if self.lr is not None and not (0 < self.lr < 1):
            bad(f"learning rate {self.lr} is out of range", "use a value like 3e-4")
        if not 0 <= self.decay_frac <= 1:
            bad(f"decay_frac {self.decay_frac} must be in [0, 1]")
        if self.autocast not in ("auto", "bfloat16", "float32"):
            bad(f"unknown autocast {self.autocast!r}", "use auto, bfloat16 or float32")
        if self.resume and self.overwrite:
            bad("--resume and --overwrite contradict each other", "choose one")
        if self.ce_contexts < 0 or not 0 < self.ce_ci_target < 1:
            bad(f"ce_contexts must be >= 0 and ce_ci_target in (0, 1), got {self.ce_contexts} and {self.ce_ci_target}")
        if self.activations is not None and len(self.site) > 1:
            bad("--activations trains on one matrix, so it takes at most one --site")
        if self.shuffle_buffer_mb <= 0:
            bad(f"--shuffle-buffer-mb must be positive, got {self.shuffle_buffer_mb}")
        self.validate_transcoders()

    def transcoder_specs(self) -> list[str]:
        """The sites that name MLPs to transcode (mlp.L, mlp.*, mlp.A-B)."""
        from trainer.sources import is_transcoder_spec

        return [s for s in self.site if is_transcoder_spec(s)]

    def validate_transcoders(self) -> None:
        from trainer.sources import transcoder_layers

        specs = self.transcoder_specs()
        layers: set[int] = set()
        every_block = False
        for s in specs:
            named = transcoder_layers(s)  # AtlasError for a malformed spec
            every_block |= named is None  # mlp.*
            layers.update(named or [])
        if self.skip_connection and not specs:
            raise AtlasError("--skip-connection only applies to transcoders", "train them with --site mlp.L or --site 'mlp.*'")
        if specs and self.activations is not None:
            raise AtlasError("a transcoder reads mlp_in.L and predicts mlp_out.L, which one --activations matrix does not hold",
                             "train transcoders from the LM (drop --activations)")
        if self.cache_activations and (every_block or len(layers) > 1):
            raise AtlasError("--cache-activations with transcoders of several blocks would store 2 sites per block on disk",
                             "a multi-block transcoder run streams from the LM: drop --cache-activations")

    def sae_configs(self, d_in: int) -> list[tuple[str, SAEConfig]]:
        """(site, SAEConfig) for every SAE of the sweep."""
        from trainer.sae import SAEConfig
        from trainer.sources import is_transcoder_spec

        out, seen = [], set()
        for site, arch, width, k in itertools.product(self.site, self.arch, self.width, self.k):
            key = (site, arch, width, k if arch in USES_K else None)
            if key in seen:
                continue
            seen.add(key)
            arch_settings = {name: getattr(self, name) for name in ARCH_SETTINGS if getattr(self, name) not in (None, [])}
            transcode = is_transcoder_spec(site)
            out.append((site, SAEConfig(d_in=d_in, d_sae=width, architecture=arch, k=k,
                                        dead_after_tokens=self.dead_tokens(arch), transcode=transcode,
                                        skip_connection=transcode and self.skip_connection, **arch_settings)))
        return out

    def dead_tokens(self, arch: str = "topk") -> int:
        from trainer.sae.base import dead_window

        if self.dead_after_tokens is not None:
            return int(self.dead_after_tokens)
        return dead_window(arch, self.tokens, self.batch_size)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))



def sae_name(site: str, cfg: SAEConfig) -> str:
    name = f"{site}-{cfg.architecture}-w{cfg.d_sae}"
    return name + (f"-k{cfg.k}" if cfg.architecture in USES_K else "")
