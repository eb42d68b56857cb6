"""Train one SAE or a sweep of SAEs on one activation stream.

    stream (LM | cache | .npy, trainer.stream)  ->  every SAE of the sweep, one step each

The LM forward pass dominates the cost, so a sweep (several sites, widths, k values or
architectures) shares it. Each SAE has its own Adam optimiser, learning-rate schedule
(linear warm-up, constant, linear decay over the last decay_frac), gradient clipping, dead-latent
counters for AuxK, JSON-lines log, and checkpoint (trainer.checkpoint). Inputs are scaled so that
their mean norm is sqrt(d_in); the scale is estimated once from the first batch and folded into
the saved weights.

Data parallel: under `torchrun --nproc_per_node N`, each rank reads its own share of the data
and DDP averages gradients; rank 0 logs, evaluates and saves.

Transcoders (sites mlp.L, mlp.*): a run reads mlp_in.L and mlp_out.L of every named block in the
same LM pass (trainer.stream), and block L's transcoder trains on that pair, its loss against
mlp_out.L (sparsify's --transcode, see trainer/sae/base.py); the output site has its own scale.
At the end each one is folded into the standard form (trainer.transcoders), evaluated against its
output site alone and, with several blocks, as a whole set spliced in at once, and the set's
manifest (transcoder_set.json) is written next to the per-block folders.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from store.errors import AtlasError
from trainer import progress
from trainer.checkpoint import CHECKPOINT, load_checkpoint, prepare_output, save_checkpoint
from trainer.config import TrainConfig, sae_name  # noqa: F401  (re-exported)
from trainer.distributed import barrier, broadcast_flag, init_distributed, shutdown
from trainer.evaluate import Evaluated, ReconstructionStats, spliced_lm_loss, spliced_set_loss
from trainer.formats import save_sae
from trainer.sae import Codes, SparseAutoencoder, StepContext, build_sae, default_lr
from trainer.sources import (
    expand_sites,
    is_transcoder_spec,
    stream_sites,
    transcoder_layers,
    transcoder_sites,
)
from trainer.stream import TrainingStream, activation_file, held_out_chunks, held_out_contexts

__all__ = ["CHECKPOINT", "Diverged", "Interrupted", "TrainConfig", "Trainer", "prepare_output", "sae_name", "train"]

log = logging.getLogger(__name__)


class _Step(nn.Module):
    """Puts an SAE's training step behind forward() so DDP can wrap it."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x, ctx):
        out = self.sae.training_step(x, ctx)
        return out.loss, out.x_hat, out.codes.values, out.codes.indices, out.terms


@dataclass
class Run:
    """One SAE being trained."""

    name: str
    site: str  # the site the SAE reads (a transcoder: mlp_in.L)
    sae: SparseAutoencoder
    folder: Path
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: torch.Tensor
    norm_scale: float = 1.0
    variance: float = 1.0  # of the normalised target (a transcoder's output site)
    last_terms: dict = field(default_factory=dict)
    output_site: str | None = None  # a transcoder's target (mlp_out.L); None for an SAE of `site`
    out_scale: float = 1.0  # a transcoder's scale of its output site (mean norm -> sqrt(D))
    layer: int | None = None  # a transcoder's block


class Diverged(AtlasError):
    exit_code = 3


class Interrupted(AtlasError):
    exit_code = 130


def lr_at(step: int, total: int, base: float, warmup_steps: int, decay_frac: float) -> float:
    warmup = max(1, min(warmup_steps, total // 10))
    factor = min(1.0, (step + 1) / warmup)
    decay_start = int(total * (1 - decay_frac))
    if decay_frac > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / max(1, total - decay_start))
    return base * factor


def check_sites(cfg: TrainConfig) -> None:
    """Site names are checked before any weights are read: their form always, the block number
    when the model's depth is known without loading it (aliases), when transcoder specs such as
    mlp.* are also expanded (else they are once the LM is loaded)."""
    from trainer.sources import ALIASES

    depth = ALIASES[cfg.model].n_layers if cfg.activations is None and cfg.model in ALIASES else None
    cfg.site = expand_sites(cfg.site, depth)


class Trainer:
    def __init__(self, cfg: TrainConfig, lm=None):
        cfg.validate()
        check_sites(cfg)
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        from trainer.lm import pick_device

        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        want_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if want_bf16 else torch.float32
        self.lm = lm
        self.array = None
        self.stream: TrainingStream | None = None
        self.runs: list[Run] = []
        self.step = 0
        self.total_steps = int(cfg.tokens // cfg.batch_size)
        self._stop_requested = False
        self.set_metrics: dict[str, dict] = {}  # configuration -> CE of its transcoder set spliced in at once

    # --- set-up ----------------------------------------------------------------------------------

    def load_inputs(self) -> int:
        """Load the LM or the activation matrix; returns d_in."""
        if self.cfg.activations is not None:
            self.array = activation_file(Path(self.cfg.activations), self.cfg)
            return self.array.d_in
        if self.lm is None:
            from trainer.lm import load_lm

            self.lm = load_lm(self.cfg.model, self.device, self.cfg.lm_dtype)
        self.cfg.site = expand_sites(self.cfg.site, self.lm.n_layers)  # validates against the model's depth
        for s in stream_sites(self.cfg.site):
            self.lm.site(s)
        return self.lm.d_model

    def sae_compute_dtype(self, sae_cfg) -> torch.dtype:
        """The SAE step's encoder precision: --autocast, where `auto` is bfloat16 on CUDA and, for
        transcoders, on CPUs with native bfloat16 matmuls (AVX512-BF16 or AMX). Measured with
        benchmarks/transcoders.py (SmolLM2-135M blocks 0-2, 49k tokens, width 4608, k 32, 2-core AMD
        EPYC with AVX512-BF16): held-out FVU 0.2881 / 0.5089 / 0.5892 in float32 and 0.2873 / 0.5084 /
        0.5894 in bfloat16, dead latents within 0.3 points; the step was only ~4% faster there, its
        time going to the sparse backward rather than the dense encoder. SAEs keep float32 on CPUs."""
        if self.cfg.autocast != "auto" or self.device.type == "cuda" or not sae_cfg.transcode:
            return self.compute_dtype
        from trainer.lm import cpu_has_bf16_matmul

        return torch.bfloat16 if cpu_has_bf16_matmul() else self.compute_dtype

    def build_runs(self, d_in: int) -> None:
        c = self.cfg
        torch.manual_seed(c.seed)
        configs = c.sae_configs(d_in)
        for site, sae_cfg in configs:
            name = sae_name(site, sae_cfg)
            folder = c.out if len(configs) == 1 else c.out / name
            sae = build_sae(sae_cfg, self.sae_compute_dtype(sae_cfg)).to(self.device)
            base_lr = c.lr or default_lr(sae_cfg, c.tokens, c.batch_size)
            optimizer = torch.optim.Adam(sae.param_groups(), lr=base_lr, betas=(0.9, 0.999))
            counter = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=self.device)
            run = Run(name, site, sae, folder, _Step(sae), optimizer, base_lr, counter)
            if is_transcoder_spec(site):
                (run.layer,) = transcoder_layers(site)
                run.site, run.output_site = transcoder_sites(run.layer)
            self.runs.append(run)

    @torch.no_grad()
    def initialise(self, first: dict[str, torch.Tensor]) -> None:
        """Estimate each site's input scale (mean norm -> sqrt(D)) and variance; init b_dec.

        Under DDP the first batch is gathered from every rank, so all ranks (and a one-process
        run on the same data) start from exactly the same numbers.
        """
        for site, x in first.items():
            if not torch.isfinite(x).all():
                raise Diverged(f"the first batch of {site} activations contains NaN or infinite values",
                               "check the model's precision (--lm-dtype float32) or the activation file")
        gathered = {}
        for site, x in first.items():
            x = x.float()
            if self.world > 1:
                parts = [torch.empty_like(x) for _ in range(self.world)]
                dist.all_gather(parts, x.contiguous())
                x = torch.cat(parts)
            gathered[site] = x
        scales: dict[str, tuple[float, float]] = {}
        for site, x in gathered.items():
            scale = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean())
            xs = x * scale
            scales[site] = (scale, float((xs - xs.mean(0)).pow(2).sum(-1).mean()))
        for run in self.runs:
            run.norm_scale, run.variance = scales[run.site]
            if run.output_site is None:
                run.sae.initialise_from(gathered[run.site] * run.norm_scale)
            else:
                run.out_scale, run.variance = scales[run.output_site]
                run.sae.initialise_from(gathered[run.site] * run.norm_scale, gathered[run.output_site] * run.out_scale)

    def wrap_ddp(self) -> None:
        if self.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # torch 2.13 renamed broadcast_buffers (a buffer sync before every forward) and warns on the old name
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
            else "broadcast_buffers"
        for run in self.runs:
            run.step_module = DDP(run.step_module, **{sync: True}, **kwargs)

    def unwrap_ddp(self) -> None:
        """Drop the DDP wrappers, which hold the process group, so the group can be torn down."""
        for run in self.runs:
            run.step_module = getattr(run.step_module, "module", run.step_module)

    # --- the loop --------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.is_main:
            print("\ninterrupt: finishing this step and saving a checkpoint (press Ctrl-C again to abort)", flush=True)

    def dead_mask(self, run: Run) -> torch.Tensor:
        """Latents that have not fired for the dead window, or for the whole run if it is shorter
        than the window (so an SAE that never fires is 100% dead from its first steps)."""
        window = min(run.sae.cfg.dead_after_tokens, max(1, self.step * self.cfg.batch_size))
        return run.tokens_since_fired >= window

    def train_step(self, run: Run, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        """One optimiser step of one SAE on activations x of its site (and, for a transcoder, the
        same tokens' activations y of its output site)."""
        total_steps = self.total_steps
        lr = lr_at(self.step, total_steps, run.base_lr, self.cfg.warmup_steps, self.cfg.decay_frac)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        dead = run.tokens_since_fired >= run.sae.cfg.dead_after_tokens
        xs = x.float() * run.norm_scale
        ys = y.float() * run.out_scale if run.output_site else None
        ctx = StepContext(self.step, total_steps, dead, run.variance, target=ys)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=run.sae.compute_dtype == torch.bfloat16 and not run.sae.sparse_training):
            loss, x_hat, values, indices, terms = run.step_module(xs, ctx)
        if not torch.isfinite(loss):
            raise Diverged(
                f"{run.name}: the loss became {float(loss.detach())} at step {self.step}; the last good checkpoint is "
                f"{self.cfg.out / CHECKPOINT}",
                "lower --lr, check the activations for NaN/inf, or resume with --resume",
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.sae.remove_parallel_gradient()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.sae.parameters(), self.cfg.grad_clip)
        run.optimizer.step()
        run.sae.after_step(ctx)
        with torch.no_grad():
            codes = Codes(values.detach(), indices)
            fired_entries = run.sae.fires(codes)
            fired = torch.zeros_like(run.tokens_since_fired).index_add_(
                0, indices[fired_entries], torch.ones_like(indices[fired_entries]))
            n_tokens = torch.tensor(x.shape[0], device=self.device)
            if self.world > 1:
                dist.all_reduce(fired)
                dist.all_reduce(n_tokens)
            run.tokens_since_fired += n_tokens
            run.tokens_since_fired[fired > 0] = 0
        return {"loss": float(loss.detach()), "lr": lr, "target": xs if ys is None else ys, "x_hat": x_hat,
                "l0": float((values > 0).sum(-1).float().mean()), **terms}

    def fit(self) -> list[Path]:
        from tqdm import tqdm

        c = self.cfg
        prepare_output(c) if self.is_main else None
        if self.world > 1:
            dist.barrier()
        d_in = self.load_inputs()
        self.build_runs(d_in)
        total_steps = self.total_steps
        position = load_checkpoint(self) if c.resume else None
        self.stream = TrainingStream(c, self.device, self.rank, self.world, lm=self.lm, array=self.array,
                                     position=position)
        batches = iter(self.stream)
        if not c.resume:
            first = next(batches, None)
            if first is None:
                raise AtlasError("the training stream produced no tokens",
                                 "check the corpus and the split (--eval-fraction), or the activation file")
            self.initialise(first)
            batches = itertools.chain([first], batches)
        self.wrap_ddp()
        if self.is_main:
            for r in self.runs:
                r.folder.mkdir(parents=True, exist_ok=True)
        logs = {r.name: open(r.folder / "metrics.jsonl", "a") for r in self.runs} if self.is_main else {}
        # Every rank catches Ctrl-C (torchrun passes it to all); rank 0's flag decides the step.
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        start = last_checkpoint = time.time()
        progress.report("train", self.step, total_steps, force=True) if self.is_main else None
        bar = tqdm(total=total_steps, initial=self.step, unit="step", desc="training", dynamic_ncols=True, mininterval=1.0,
                   disable=not self.is_main)
        try:
            while self.step < total_steps:
                batch = next(batches, None)
                if batch is None:
                    raise AtlasError("the training stream ended", "check the corpus and the split (--eval-fraction)")
                for run in self.runs:
                    targets = () if run.output_site is None else (batch[run.output_site],)
                    out = self.train_step(run, batch[run.site], *targets)
                    if self.is_main and (self.step % c.log_every == 0 or self.step == total_steps - 1):
                        record = self._log_record(run, out, start)
                        logs[run.name].write(json.dumps(record) + "\n")
                        logs[run.name].flush()
                        run.last_terms = record
                self.step += 1
                bar.update(1)
                if self.runs[0].last_terms:
                    t = self.runs[0].last_terms
                    bar.set_postfix(fvu=f"{t['fvu']:.3f}", l0=f"{t['l0']:.1f}", dead=f"{t['dead_frac']:.1%}", refresh=False)
                if self.is_main:
                    progress.report("train", self.step, total_steps)
                due = c.checkpoint_every_s > 0 and time.time() - last_checkpoint >= c.checkpoint_every_s
                if c.checkpoint_every_s > 0:  # every rank must agree on the step
                    due = broadcast_flag(due, self.device)
                if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or due:
                    save_checkpoint(self)
                    last_checkpoint = time.time()
                stop = self._stop_requested if self.world == 1 else broadcast_flag(self._stop_requested, self.device)
                if stop:
                    save_checkpoint(self)
                    raise Interrupted(f"training stopped at step {self.step}; checkpoint saved in {c.out}",
                                      "continue with the same command plus --resume")
        finally:
            bar.close()
            for fh in logs.values():
                fh.close()
            signal.signal(signal.SIGINT, previous)
        save_checkpoint(self)
        if not self.is_main:
            return []
        progress.report("evaluate", 0, 1, force=True)
        metrics = self.evaluate()
        for run in self.runs:
            sae, scale = self.saved_form(run)
            save_sae(run.folder, sae, scale, run.site, c.model if self.array is None else "activations",
                     training={**c.to_json(), "steps": int(self.step), "elapsed_s": time.time() - start,
                               "world_size": self.world},
                     metrics=metrics[run.name], context_size=c.ctx_len, corpus=c.corpus if self.array is None else str(c.activations),
                     output_site=run.output_site)
            (run.folder / "metrics.json").write_text(json.dumps(metrics[run.name], indent=2))
        self.write_sets(metrics)
        return [r.folder for r in self.runs]

    def saved_form(self, run: Run) -> tuple[SparseAutoencoder, float]:
        """(SAE, input scale still to fold) as save_sae and Evaluated take it: an SAE as trained
        with its scale, a transcoder in the standard form with both scales folded in."""
        if run.output_site is None:
            return run.sae, run.norm_scale
        from trainer.transcoders import finished_transcoder

        return finished_transcoder(run.sae, run.norm_scale, run.out_scale), 1.0

    def set_groups(self) -> dict[str, list[Run]]:
        """The run's transcoder sets: its transcoders grouped by configuration."""
        from trainer.transcoders import set_groups

        entries = [(r.layer, r.name, r.sae.cfg) for r in self.runs if r.output_site is not None]
        by_name = {r.name: r for r in self.runs}
        return {tag: [by_name[name] for _, name, _ in group] for tag, group in set_groups(entries).items()}

    def write_sets(self, metrics: dict[str, dict]) -> list[Path]:
        """A transcoder set manifest per configuration (trainer.transcoders.sets)."""
        from trainer.config import USES_K
        from trainer.transcoders import SetLayer, write_transcoder_set

        groups = self.set_groups()
        paths = []
        for tag, runs in groups.items():
            cfg = runs[0].sae.cfg
            layers = [SetLayer(r.layer, str(r.folder.relative_to(self.cfg.out)) if r.folder != self.cfg.out else ".",
                               r.site, r.output_site, cfg.architecture, metrics[r.name]) for r in runs]
            paths.append(write_transcoder_set(self.cfg.out, tag, len(groups) == 1, self.cfg.model, self.lm.n_layers,
                                              cfg.architecture, cfg.d_sae, cfg.k if cfg.architecture in USES_K else None,
                                              cfg.skip_connection, layers, self.set_metrics.get(tag, {})))
        return paths

    def _log_record(self, run: Run, out: dict, start: float) -> dict:
        x, x_hat = out["target"], out["x_hat"].detach().float()
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
        record = {"step": int(self.step), "tokens": int((self.step + 1) * self.cfg.batch_size), "loss": out["loss"],
                  "fvu": fvu, "l0": out["l0"], "dead_frac": float(self.dead_mask(run).float().mean()),
                  "lr": out["lr"], "elapsed_s": round(time.time() - start, 2)}
        record.update({k: v for k, v in out.items() if k not in ("target", "x_hat", "loss", "lr", "l0")})
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict]:
        """Held-out metrics of every SAE: reconstruction (a transcoder's against its output site),
        CE with each one spliced in alone, and CE with each transcoder set spliced in at once
        (kept in self.set_metrics)."""
        c = self.cfg
        models = []
        for run in self.runs:
            sae, scale = self.saved_form(run)
            models.append(Evaluated(sae.eval(), run.site, scale, run.output_site))
        stats = [ReconstructionStats(m) for m in models]
        for chunk in held_out_chunks(c, self.lm, self.array):
            for run, st in zip(self.runs, stats):
                st.update(chunk[run.site], chunk[run.output_site] if run.output_site else None)
        metrics = {}
        for run, st in zip(self.runs, stats):
            m = st.result()
            m["dead_frac"] = float(self.dead_mask(run).float().mean())
            m["dead_after_tokens"] = int(run.sae.cfg.dead_after_tokens)
            m["train_tokens"] = int(self.step * c.batch_size)
            m["norm_scale"] = run.norm_scale
            if run.output_site is not None:
                m["output_norm_scale"] = run.out_scale
            m["lr"] = run.base_lr
            metrics[run.name] = m
        self.set_metrics = {}
        if self.lm is not None and c.ce_contexts > 0:
            if c.ce_each:
                contexts = held_out_contexts(c, self.lm, min(c.lm_batch_size, 32))
                ce = spliced_lm_loss(self.lm, models, contexts, c.exclude_bos, c.sink_norm_ratio, max_contexts=c.ce_contexts,
                                     min_contexts=min(32, c.ce_contexts), target=c.ce_ci_target)
                for i, run in enumerate(self.runs):
                    metrics[run.name].update(ce.get(i, {}))
            index = {r.name: i for i, r in enumerate(self.runs)}
            for tag, runs in self.set_groups().items():
                if len(runs) < 2:
                    continue
                contexts = held_out_contexts(c, self.lm, min(c.lm_batch_size, 32))
                self.set_metrics[tag] = spliced_set_loss(
                    self.lm, [models[index[r.name]] for r in runs], contexts, c.exclude_bos, c.sink_norm_ratio,
                    max_contexts=c.ce_contexts, min_contexts=min(32, c.ce_contexts), target=c.ce_ci_target)
        return metrics


def train(cfg: TrainConfig, lm=None) -> list[Path]:
    """Train the SAE(s) described by cfg; returns their folders (empty on non-zero DDP ranks)."""
    trainer = None
    try:
        trainer = Trainer(cfg, lm)
        folders = trainer.fit()
        # Rank 0 evaluates and saves after the other ranks are done; tearing the group down on one
        # rank while another still holds its connections can abort that rank's gloo threads at exit.
        barrier()
        return folders
    finally:
        # A DDP reducer left alive (the wrappers sit in reference cycles) keeps the process group
        # until interpreter exit, where destroying it aborts the process ("terminate called without
        # an active exception", measured 5 of 40 two-rank runs under load); free them first.
        if trainer is not None:
            trainer.unwrap_ddp()
            del trainer
            gc.collect()
        shutdown()
