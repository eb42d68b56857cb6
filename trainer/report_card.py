"""A report card for one SAE folder (ours, or SAELens / sparsify / Gemma Scope, imported or not):
what `sae-atlas evaluate` computes.

The metrics are trainer/evaluate.py's, the same code that scores an SAE at the end of training:

- reconstruction_metrics on `tokens` held-out tokens: FVU (against the held-out mean), explained
  variance, MSE, L0, the share of latents that never fired on those tokens (dead_frac_eval) and of
  latents firing on more than 10 % of them (dense_frac), and the mean cosine of x_hat and x;
- spliced_lm_loss on exactly `contexts` held-out contexts: the LM's next-token loss clean, with
  the SAE's output spliced in at its site (at the positions the SAE reads: BOS and attention sinks
  keep their values), and with zeros spliced in; CE recovered = (CE_zero - CE_sae) / (CE_zero -
  CE_clean) and delta LM loss = CE_sae - CE_clean.

Intervals: 95 % intervals from the per-context losses, paired (trainer.evaluate.ce_interval): every
context is run clean, zero-ablated and spliced, so delta LM loss has a Student t interval on the
mean of the per-context differences d_i = CE_sae,i - CE_clean,i, and CE recovered, a ratio of
means, a delta-method interval with t quantiles (scipy.stats.t). No bootstrap: it would cost as many
LM passes again. Contexts are treated as independent draws; neighbouring contexts cut from one long
document are not quite, so on long documents the interval is somewhat optimistic.

Held-out text: the documents the training run held out (trainer.stream.held_out_contexts: the
corpus's eval split by eval_fraction and seed, packed into contexts of ctx_len), with the SAE's own
training settings as defaults; an imported SAE gets pydoc, ctx_len 128 and eval_fraction 0.1.
The reconstruction metrics read the first contexts of that split, the loss the first `contexts`
of them, so the two parts score the same text where they overlap.

From the training run (--from-training): the end of training already ran this same code
(trainer.train's evaluate: ReconstructionStats and spliced_lm_loss) on the same held-out split,
on `eval_tokens` tokens and on held-out contexts added until both intervals were within +-0.5 %
(or its ce_contexts cap). Those numbers, kept in the folder (metrics.json, and cfg.json's metrics),
are then the card's reconstruction metrics and losses, finished as a fresh card's are
(finish_ce); only what the training run did not measure (--probing, --absorption) is measured. It
is refused for a folder without that evaluation (an imported SAE, an SAE trained without an LM)
and where a held-out setting differs from the training run's, and it needs no LM pass at all when
nothing else is asked (`make demo` stores its SAEs' cards this way).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from store.errors import AtlasError
from store.publish import clean_json
from trainer.activations import valid_token_mask
from trainer.evaluate import Evaluated, reconstruction_metrics, spliced_lm_loss

log = logging.getLogger(__name__)

INTERVAL_METHOD = "paired per-context: t interval of the mean difference (delta LM loss), delta method (CE recovered)"


@dataclass
class EvaluateConfig:
    """What to evaluate and on how much held-out text (CLI flags have the same names)."""

    sae_dir: Path
    """The SAE folder (resolved from a published SAE's name by the command)."""
    model: str | None = None
    """LM to run; default: the model the SAE says it reads."""
    site: str | None = None
    """Activation site; default: the SAE's own."""
    corpus: str | None = None
    """Corpus whose held-out documents are read; default: the SAE's training corpus, else pydoc."""
    text_field: str = "text"
    """Text field of .jsonl/.parquet/HF corpora."""
    eval_fraction: float | None = None
    """Held-out share of documents; default: the SAE's training value, else 0.1."""
    ctx_len: int | None = None
    """Tokens per context, BOS included; default: the SAE's training value, else 128."""
    seed: int = 0
    """Seed of the held-out split (the training run's seed keeps its split)."""
    tokens: int = 65_536
    """Held-out tokens for the reconstruction metrics (FVU, L0, dead, dense, cosine)."""
    contexts: int = 128
    """Held-out contexts for the CE losses (at least 2: the interval needs a spread); more narrow the
    intervals roughly as 1/sqrt(contexts)."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    batch_size: int = 4096
    """Tokens per SAE batch of the reconstruction metrics."""
    exclude_bos: bool = True
    """Leave the BOS position out (of the metrics, and of the splice: it keeps its value)."""
    sink_norm_ratio: float | None = 10.0
    """Leave out tokens whose activation norm exceeds this multiple of the context's median (attention sinks)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    lm_dtype: str = "auto"
    """LM precision: auto, float32, bfloat16, float16."""
    probing: bool = False
    """Also run SAEBench's sparse probing on tasks built from --probe-corpus (trainer/sparse_probing.py;
    off by default: at the default sizes it reads 1,400 more texts through the LM)."""
    probe_corpus: str = "pydoc"
    """Corpus the probing tasks are built from (module_family needs pydoc's qualified-name titles)."""
    probe_tasks: list[str] = field(default_factory=lambda: ["module_family", "code_vs_prose"])
    """Probing tasks (trainer/probing_tasks.py): module_family, code_vs_prose."""
    probe_train: int = 150
    """Train texts per class of each probing task."""
    probe_test: int = 50
    """Test texts per class of each probing task."""
    probe_k: list[int] = field(default_factory=lambda: [1, 2, 5])
    """k of the top-k probes (SAEBench: 1, 2, 5)."""
    probe_ctx_len: int = 128
    """Tokens per probing text, BOS included (SAEBench: 128)."""
    absorption: bool = False
    """Also measure SAEBench's feature absorption on the first-letter task (trainer/absorption.py)."""
    absorption_words: int = 1500
    """Alphabetic tokens drawn for the first-letter task (80 % train the probes, 20 % test)."""
    from_training: bool = False
    """Take FVU, L0, dead, dense, cosine and the CE losses with their intervals from the held-out
    evaluation the training run made (the same code on the same split; --tokens and --contexts are
    then the training run's) instead of measuring them again; only --probing / --absorption run."""

    def validate(self) -> None:
        for name in ("tokens", "lm_batch_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise AtlasError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.contexts < 2:
            raise AtlasError(f"--contexts {self.contexts} is too few: a 95% interval needs at least 2 contexts",
                             "use --contexts 32 or more")
        if self.ctx_len is not None and self.ctx_len < 4:
            raise AtlasError(f"--ctx-len {self.ctx_len} is too short", "use at least 4 tokens (128 is usual)")
        if self.probing and (self.probe_train < 2 or self.probe_test < 1 or not self.probe_k or min(self.probe_k) < 1):
            raise AtlasError("--probe-train must be at least 2, --probe-test at least 1 and every --probe-k at least 1")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise AtlasError(f"--eval-fraction {self.eval_fraction} must be in (0, 1)",
                             "the held-out share of documents, e.g. 0.1")


@dataclass
class ReportCard:
    """The result of one evaluation: what was measured (metrics) on what (settings)."""

    sae_dir: Path
    settings: dict
    metrics: dict
    n_tokens: int
    """Held-out tokens of the reconstruction metrics."""
    elapsed_s: float = 0.0

    def to_json(self) -> dict:
        return {"sae_dir": str(self.sae_dir), "settings": self.settings, "metrics": self.metrics,
                "n_tokens": self.n_tokens, "elapsed_s": round(self.elapsed_s, 2)}


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=not progress,
                mininterval=0.5)


def prepare(cfg: EvaluateConfig, lm=None, need_lm: bool = True):
    """Load and check the SAE and the LM: (loaded SAE, LM, Evaluated); every refusal is one AtlasError.
    With need_lm False and no lm given, no LM is loaded (None) and the SAE stays on the CPU."""
    from trainer.analyze import resolve_defaults
    from trainer.formats import check_native_hook, load_sae
    from trainer.lm import load_lm

    cfg.validate()
    loaded = load_sae(cfg.sae_dir)
    resolve_defaults(cfg, loaded)  # model, site, corpus, text field, ctx_len, eval_fraction as analysis fills them
    if lm is None and not need_lm:
        if loaded.transcoder and not loaded.output_site:
            raise AtlasError(f"{cfg.sae_dir} is a transcoder that does not say which site it predicts",
                             "import it again with --output-site, e.g. mlp_out.12")
        return loaded, None, Evaluated(loaded.sae.eval(), cfg.site, 1.0,
                                       output_site=loaded.output_site if loaded.transcoder else None)
    lm = lm or load_lm(cfg.model, cfg.device, cfg.lm_dtype)
    lm.site(cfg.site)  # the site must exist in this model (a one-line error naming its blocks otherwise)
    output_site = loaded.output_site if loaded.transcoder else None
    if loaded.transcoder and not output_site:
        raise AtlasError(f"{cfg.sae_dir} is a transcoder that does not say which site it predicts",
                         "import it again with --output-site, e.g. mlp_out.12")
    if output_site:
        lm.site(output_site)
    check_native_hook(loaded.native_hook, lm, output_site or cfg.site, cfg.site if output_site else None)
    d_in = loaded.sae.cfg.d_in
    if d_in != lm.d_model:
        raise AtlasError(f"the SAE reads {d_in}-dimensional activations but {cfg.model} site {cfg.site} has {lm.d_model}",
                         "pass the --model (and --site) the SAE was trained on")
    sae = loaded.sae.to(lm.device).eval()
    return loaded, lm, Evaluated(sae, cfg.site, 1.0, output_site=output_site)  # saved folders fold the scale in


@torch.no_grad()
def evaluate_folder(cfg: EvaluateConfig, lm=None, progress: bool = True) -> ReportCard:
    """Every metric of the report card for the SAE in cfg.sae_dir (see the module docstring)."""
    from trainer.stream import held_out_contexts

    started = time.time()
    if cfg.from_training:
        return card_from_training(cfg, lm, progress)
    loaded, lm, model = prepare(cfg, lm)
    site, target_site = lm.site(model.site), lm.site(model.target_site)
    need_ctx = cfg.contexts
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    n_rec = 0
    ce_batches: list[torch.Tensor] = []
    n_ce = 0
    # One walk over the held-out split: activations for the reconstruction metrics until `tokens`
    # valid tokens are read, and the first `contexts` contexts kept for the loss passes.
    bar = _bar(cfg.tokens, "reading held-out activations", "tok", progress)
    for tokens in held_out_contexts(cfg, lm, cfg.lm_batch_size):
        if n_ce < need_ctx:
            ce_batches.append(tokens[:need_ctx - n_ce])
            n_ce += len(ce_batches[-1])
        if n_rec < cfg.tokens:
            sites = [site] if target_site == site else [site, target_site]
            acts = lm.read(tokens, sites)
            mask = valid_token_mask(acts[site.name], cfg.sink_norm_ratio, cfg.exclude_bos)
            xs.append(acts[site.name][mask].float().cpu())
            if target_site != site:
                ys.append(acts[target_site.name][mask].float().cpu())
            n_rec += len(xs[-1])
            bar.update(min(n_rec, cfg.tokens) - bar.n)
        if n_rec >= cfg.tokens and n_ce >= need_ctx:
            break
    bar.close()
    if n_ce < 2 or n_rec == 0:
        raise AtlasError(f"the held-out split of corpus {cfg.corpus!r} holds only {n_ce} context(s) of {cfg.ctx_len} tokens",
                         "use a larger --corpus or raise --eval-fraction")
    if n_rec < cfg.tokens:
        log.warning("the held-out split holds %d valid tokens, fewer than --tokens %d", n_rec, cfg.tokens)
    if n_ce < need_ctx:
        log.warning("the held-out split holds %d contexts, fewer than --contexts %d", n_ce, need_ctx)
    x = torch.cat(xs)[:cfg.tokens]
    target = torch.cat(ys)[:cfg.tokens] if ys else None
    metrics = reconstruction_metrics(model, x, cfg.batch_size, target=target)
    del x, target, xs, ys

    ce_bar = _bar(n_ce, "spliced LM loss", "ctx", progress)

    def counted():
        for b in ce_batches:
            ce_bar.update(len(b))
            yield b

    ce = spliced_lm_loss(lm, [model], counted(), cfg.exclude_bos, cfg.sink_norm_ratio,
                         max_contexts=n_ce, min_contexts=n_ce)[0]
    ce_bar.close()
    for key in ("ce_ci_met", "ce_ci_target"):  # a fixed number of contexts: no stopping rule to report
        ce.pop(key, None)
    metrics.update(finish_ce(ce, cfg.ctx_len))
    metrics.update(saebench_measures(cfg, lm, model, progress))
    return _card(cfg, loaded, model, metrics, str(lm.dtype).removeprefix("torch."), started)


def finish_ce(ce: dict, ctx_len: int) -> dict:
    """The losses of spliced_lm_loss as the card shows them: each interval also as [low, high], and
    the predicted tokens they were measured on."""
    ce = dict(ce)
    for key in ("ce_recovered", "delta_lm_loss"):
        hw = ce.get(f"{key}_ci95")
        ce[f"{key}_interval"] = None if hw is None or ce.get(key) is None else [ce[key] - hw, ce[key] + hw]
    ce["ce_tokens"] = int(ce["ce_contexts"] * (ctx_len - 1))
    return ce


def _card(cfg: EvaluateConfig, loaded, model: Evaluated, metrics: dict, lm_dtype: str | None, started: float,
          extra: dict | None = None) -> ReportCard:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update({"lm_dtype_used": lm_dtype, "confidence": 0.95, "interval": INTERVAL_METHOD,
                     "source_format": loaded.source_format, "kind": loaded.kind, "output_site": model.output_site,
                     **(extra or {})})
    return ReportCard(Path(cfg.sae_dir), clean_json(settings), clean_json(metrics), int(metrics["eval_tokens"]),
                      time.time() - started)


# What the training run's held-out evaluation measured that a report card shows (the rest of its
# metrics, e.g. the window-based dead_frac or the learning rate, describe the run, not the card).
RECONSTRUCTION_KEYS = ("mse", "fvu", "explained_variance", "l0", "cos_sim", "dead_frac_eval", "dense_frac", "eval_tokens")
CE_KEYS = ("ce_clean", "ce_zero_ablation", "ce_sae", "ce_recovered", "ce_recovered_ci95", "delta_lm_loss",
           "delta_lm_loss_ci95", "ce_contexts")
# Settings (EvaluateConfig and TrainConfig alike) that must be the training run's for its held-out
# split, and the tokens it kept, to be the card's.
SAME_AS_TRAINING = ("corpus", "text_field", "eval_fraction", "ctx_len", "seed", "exclude_bos", "sink_norm_ratio")


@torch.no_grad()
def card_from_training(cfg: EvaluateConfig, lm=None, progress: bool = True) -> ReportCard:
    """The report card of an SAE of ours from its training run's held-out evaluation (module
    docstring), plus the SAEBench measures asked for."""
    started = time.time()
    need_lm = cfg.probing or cfg.absorption
    loaded, lm, model = prepare(cfg, lm, need_lm=need_lm)
    training, m = loaded.meta.get("training") or {}, loaded.metrics or {}
    missing = [k for k in (*RECONSTRUCTION_KEYS, *CE_KEYS) if k not in m and k != "cos_sim"]
    if not training or missing:
        what = "no training run" if not training else f"a training evaluation without {', '.join(missing)}"
        raise AtlasError(f"{cfg.sae_dir} has {what}: there is nothing to take the report card from",
                         "evaluate it without --from-training")
    sites = training.get("site") or [cfg.site]
    if training.get("model") not in (None, cfg.model) or cfg.site not in ([sites] if isinstance(sites, str) else sites):
        raise AtlasError(f"--from-training: the training run read {training.get('model')} {training.get('site')}, "
                         f"not {cfg.model} {cfg.site}", "leave out --model and --site, or evaluate without --from-training")
    for key in SAME_AS_TRAINING:
        if key in training and getattr(cfg, key) != training[key]:
            flag = "--" + key.replace("_", "-")
            raise AtlasError(f"--from-training: {flag} {getattr(cfg, key)!r} is not the training run's "
                             f"{training[key]!r}, so its held-out split is not the card's",
                             f"pass {flag} {training[key]} or evaluate without --from-training")
    cfg.tokens = int(training.get("eval_tokens") or m["eval_tokens"])
    cfg.contexts = int(m["ce_contexts"])
    metrics = {k: m[k] for k in RECONSTRUCTION_KEYS if k in m}
    metrics.update(finish_ce({k: m[k] for k in CE_KEYS}, cfg.ctx_len))
    metrics.update(saebench_measures(cfg, lm, model, progress))
    extra = {"metrics_from": "training run's held-out evaluation",
             "contexts_rule": (f"added until both intervals were within +-{m['ce_ci_target']} "
                               f"(met: {bool(m.get('ce_ci_met'))}), at most {training.get('ce_contexts')}"
                               if "ce_ci_target" in m else None),
             "training_lm_dtype": training.get("lm_dtype")}
    return _card(cfg, loaded, model, metrics, str(lm.dtype).removeprefix("torch.") if lm is not None else None,
                 started, extra)



def saebench_measures(cfg: EvaluateConfig, lm, model: Evaluated, progress: bool = False) -> dict:
    """The SAEBench measures asked for: {"sparse_probing": ..., "absorption": ...} (each optional)."""
    from trainer.sparse_probing import dense_encoder

    out: dict = {}
    encode = dense_encoder(model.sae, model.norm_scale)
    if cfg.probing:
        from trainer.probing_tasks import build_tasks
        from trainer.sparse_probing import sparse_probing

        tasks = build_tasks(cfg.probe_corpus, cfg.probe_tasks, cfg.probe_train, cfg.probe_test, cfg.seed)
        total = sum(len(v) for t in tasks for split in (t.train, t.test) for v in split.values())
        bar = _bar(total, "sparse probing", "text", progress)
        out["sparse_probing"] = sparse_probing(lm, model.site, tasks, encode, tuple(cfg.probe_k), cfg.probe_ctx_len,
                                               cfg.lm_batch_size, cfg.seed, progress=bar.update)
        bar.close()
    if cfg.absorption:
        from trainer.absorption import AbsorptionConfig, absorption

        if model.output_site:
            raise AtlasError("absorption compares decoder directions with a probe on the SAE's own site; a transcoder "
                             "writes to another site", "evaluate it without --absorption")
        w_dec = model.sae.W_dec.detach().float().cpu()
        acfg = AbsorptionConfig(n_words=cfg.absorption_words, batch_size=cfg.lm_batch_size, seed=cfg.seed)
        out["absorption"] = absorption(lm, model.site, encode, w_dec, acfg)
    return out
