"""Train one SAE or a sweep of SAEs on one activation stream.

    stream (LM | cache | .npy)  ->  shuffle buffer  ->  every SAE of the sweep, one step each

The LM forward pass dominates the cost, so a sweep (several sites, widths, k values or
architectures) shares it. Each SAE has its own Adam optimiser, learning-rate schedule
(linear warm-up, constant, linear decay over the last decay_frac), gradient clipping, dead-latent
counters for AuxK, JSON-lines log, and checkpoint. Inputs are scaled so that their mean norm is
sqrt(d_in); the scale is estimated once from the first batches and folded into the saved weights.

Data parallel: under `torchrun --nproc_per_node N`, each rank reads its own share of the data
and DDP averages gradients; rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from app.errors import AtlasError
from app.settings import get_settings
from trainer import progress
from trainer.activations import (
    ActivationCache,
    ArrayActivations,
    LMActivations,
    LMStreamSpec,
    ShuffleBuffer,
    cached_eval_activations,
)
from trainer.config import TOPK_FAMILY, TrainConfig, sae_name  # noqa: F401  (re-exported)
from trainer.evaluate import Evaluated, reconstruction_metrics, spliced_lm_loss
from trainer.formats import save_sae
from trainer.sae import SparseAutoencoder, StepContext, build_sae, lr_for_width

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


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
    site: str
    sae: SparseAutoencoder
    folder: Path
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: torch.Tensor
    norm_scale: float = 1.0
    variance: float = 1.0
    last_terms: dict = field(default_factory=dict)


class Diverged(AtlasError):
    exit_code = 3


class Interrupted(AtlasError):
    exit_code = 130


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    rank, world, _ = _dist_info()
    return rank, world


def lr_at(step: int, total: int, base: float, warmup_steps: int, decay_frac: float) -> float:
    warmup = max(1, min(warmup_steps, total // 10))
    factor = min(1.0, (step + 1) / warmup)
    decay_start = int(total * (1 - decay_frac))
    if decay_frac > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / max(1, total - decay_start))
    return base * factor


def prepare_output(cfg: TrainConfig) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise AtlasError(f"output {out} is a file", "choose a folder for --out")
    if out.is_dir() and any(out.iterdir()):
        has_run = (out / CHECKPOINT).exists() or (out / "cfg.json").exists() or (out / "run.json").exists()
        if cfg.resume:
            if not (out / CHECKPOINT).exists():
                raise AtlasError(f"--resume: {out} has no checkpoint to resume from", "start a new run without --resume")
            return
        if cfg.overwrite:
            if not has_run:
                raise AtlasError(f"{out} is not empty and does not look like an SAE run; refusing to delete it",
                                 "choose an empty or new folder for --out")
            shutil.rmtree(out)
        else:
            what = "holds another run" if has_run else "is not empty"
            raise AtlasError(f"output folder {out} {what}", "use --overwrite to replace it, --resume to continue it, or another --out")
    elif cfg.resume:
        raise AtlasError(f"--resume: {out} has no checkpoint to resume from", "start a new run without --resume")
    out.mkdir(parents=True, exist_ok=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, lm=None):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        from trainer.lm import pick_device

        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        want_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if want_bf16 else torch.float32
        self.lm = lm
        self.array: ArrayActivations | None = None
        self.runs: list[Run] = []
        self.step = 0
        self.chunks_consumed = 0
        self._stop_requested = False

    # --- data ------------------------------------------------------------------------------------

    def stream_spec(self, split: str) -> LMStreamSpec:
        c = self.cfg
        return LMStreamSpec(model=c.model, sites=list(c.site), corpus=c.corpus, text_field=c.text_field, ctx_len=c.ctx_len,
                            split=split, eval_fraction=c.eval_fraction, seed=c.seed, exclude_bos=c.exclude_bos,
                            sink_norm_ratio=c.sink_norm_ratio, lm_dtype=str(self.lm.dtype) if self.lm else c.lm_dtype)

    def load_inputs(self) -> int:
        """Load the LM or the activation matrix; returns d_in."""
        if self.cfg.activations is not None:
            self.array = ArrayActivations(Path(self.cfg.activations), eval_fraction=max(self.cfg.eval_fraction, 0.01),
                                          seed=self.cfg.seed)
            return self.array.d_in
        if self.lm is None:
            from trainer.lm import load_lm

            self.lm = load_lm(self.cfg.model, self.device, self.cfg.lm_dtype)
        for s in self.cfg.site:
            self.lm.site(s)  # validates against the model's depth
        return self.lm.d_model

    def training_batches(self, skip_chunks: int = 0):
        c = self.cfg
        site = c.site[0]
        if self.array is not None:
            per_rank = c.batch_size // self.world
            for batch in self.array.batches(c.batch_size, self.rank, self.world, skip=skip_chunks):
                self.chunks_consumed += 1
                yield {site: batch[:per_rank].to(self.device)}
            return
        spec = self.stream_spec("train")
        if c.cache_activations:
            cache = ActivationCache(get_settings().data_dir / "activations", spec)
            if not cache.covers(c.tokens):
                if self.is_main:
                    self._fill_cache(cache, spec)
                if self.world > 1:
                    dist.barrier()
            chunks = cache.reader(seed=c.seed, rank=self.rank, world_size=self.world, skip_chunks=skip_chunks)
        else:
            chunks = LMActivations(self.lm, spec, c.lm_batch_size, rank=self.rank, world_size=self.world,
                                   skip_batches=skip_chunks)

        def counted(it):
            for chunk in it:
                self.chunks_consumed += 1
                yield chunk

        buffer = ShuffleBuffer(counted(chunks), c.batch_size // self.world, c.shuffle_buffer // self.world,
                               seed=c.seed + self.rank, device=self.device)
        yield from buffer

    def _fill_cache(self, cache: ActivationCache, spec: LMStreamSpec) -> None:
        from tqdm import tqdm

        from trainer.corpus import count_tokens, open_corpus

        corpus = open_corpus(spec.corpus, spec.text_field)
        target = self.cfg.tokens
        if corpus.finite:
            target = min(target, count_tokens(corpus, self.lm.tokenizer, "train", spec.eval_fraction))
        source = LMActivations(self.lm, spec, self.cfg.lm_batch_size)
        with tqdm(total=target, unit="tok", unit_scale=True, desc="caching activations", dynamic_ncols=True) as bar:
            cache.write(source, max_tokens=self.cfg.tokens, progress=bar.update)
        log.info("cached %d tokens of activations in %s", cache.meta()["tokens"], cache.dir)

    def eval_activations(self) -> dict[str, torch.Tensor]:
        c = self.cfg
        if self.array is not None:
            return {c.site[0]: self.array.eval_tensor(c.eval_tokens)}
        if c.cache_activations:  # a cache of the held-out split (e.g. the demo's) saves an LM pass
            cached = cached_eval_activations(get_settings().data_dir / "activations", self.stream_spec("eval"),
                                             c.eval_tokens)
            if cached is not None:
                return cached
        source = LMActivations(self.lm, self.stream_spec("eval"), c.lm_batch_size, max_tokens=c.eval_tokens, epochs=1)
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in c.site}
        for chunk in source:
            for s, v in chunk.items():
                parts[s].append(v.cpu())
        if not parts[c.site[0]]:
            raise AtlasError("the held-out split is empty", "raise --eval-fraction or use a larger corpus")
        return {s: torch.cat(v)[:c.eval_tokens] for s, v in parts.items()}

    def eval_contexts(self) -> torch.Tensor:
        from trainer.corpus import Packer, open_corpus, split_documents

        c = self.cfg
        packer = Packer(self.lm.tokenizer, c.ctx_len, self.lm.bos_token_id, self.lm.separator_token_id)
        docs = split_documents(open_corpus(c.corpus, c.text_field), "eval", c.eval_fraction, c.seed)
        batches = list(packer.batches(docs, c.ce_contexts, max_contexts=c.ce_contexts))
        return batches[0].tokens if batches else torch.empty(0, c.ctx_len, dtype=torch.long)

    # --- set-up ----------------------------------------------------------------------------------

    def build_runs(self, d_in: int) -> None:
        c = self.cfg
        torch.manual_seed(c.seed)
        configs = c.sae_configs(d_in)
        for site, sae_cfg in configs:
            name = sae_name(site, sae_cfg)
            folder = c.out if len(configs) == 1 else c.out / name
            sae = build_sae(sae_cfg, self.compute_dtype).to(self.device)
            step_module: nn.Module = _Step(sae)
            base_lr = c.lr or lr_for_width(sae_cfg.d_sae)
            optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=(0.9, 0.999))
            counter = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=self.device)
            self.runs.append(Run(name, site, sae, folder, step_module, optimizer, base_lr, counter))

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
            run.sae.initialise_from(gathered[run.site] * run.norm_scale)

    def wrap_ddp(self) -> None:
        if self.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        for run in self.runs:
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            run.step_module = DDP(run.step_module, broadcast_buffers=True, **kwargs)

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = {
            "step": self.step,
            "chunks_consumed": self.chunks_consumed,
            "world_size": self.world,
            "runs": {r.name: {"sae": r.sae.state_dict(), "optimizer": r.optimizer.state_dict(),
                              "tokens_since_fired": r.tokens_since_fired.cpu(), "norm_scale": r.norm_scale,
                              "variance": r.variance} for r in self.runs},
        }
        path = self.cfg.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        (self.cfg.out / "run.json").write_text(json.dumps({"config": self.cfg.to_json(), "step": self.step,
                                                           "saes": [r.name for r in self.runs]}, indent=1))

    def load_checkpoint(self) -> None:
        path = self.cfg.out / CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise AtlasError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}",
                             "start again with --overwrite") from None
        missing = [r.name for r in self.runs if r.name not in state["runs"]]
        if missing:
            raise AtlasError(f"checkpoint {path} has no state for {', '.join(missing)}",
                             "resume with the same sweep settings as the original run")
        for r in self.runs:
            s = state["runs"][r.name]
            r.sae.load_state_dict(s["sae"])
            r.optimizer.load_state_dict(s["optimizer"])
            r.tokens_since_fired.copy_(s["tokens_since_fired"].to(self.device))
            r.norm_scale, r.variance = float(s["norm_scale"]), float(s["variance"])
        self.step = int(state["step"])
        self.chunks_consumed = int(state["chunks_consumed"])

    # --- the loop --------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.is_main:
            print("\ninterrupt: finishing this step and saving a checkpoint (press Ctrl-C again to abort)", flush=True)

    def train_step(self, run: Run, x: torch.Tensor, total_steps: int) -> dict:
        lr = lr_at(self.step, total_steps, run.base_lr, self.cfg.warmup_steps, self.cfg.decay_frac)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        dead = run.tokens_since_fired >= run.sae.cfg.dead_after_tokens
        ctx = StepContext(self.step, total_steps, dead, run.variance)
        xs = x.float() * run.norm_scale
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.compute_dtype == torch.bfloat16 and not run.sae.sparse_training):
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
            active = values > 0
            fired = torch.zeros_like(run.tokens_since_fired).index_add_(0, indices[active], torch.ones_like(indices[active]))
            n_tokens = torch.tensor(x.shape[0], device=self.device)
            if self.world > 1:
                dist.all_reduce(fired)
                dist.all_reduce(n_tokens)
            run.tokens_since_fired += n_tokens
            run.tokens_since_fired[fired > 0] = 0
        return {"loss": float(loss.detach()), "lr": lr, "x": xs, "x_hat": x_hat, "active": active, **terms}

    def fit(self) -> list[Path]:
        from tqdm import tqdm

        c = self.cfg
        prepare_output(c) if self.is_main else None
        if self.world > 1:
            dist.barrier()
        d_in = self.load_inputs()
        self.build_runs(d_in)
        total_steps = c.tokens // c.batch_size
        batches = None
        if c.resume:
            self.load_checkpoint()
            batches = self.training_batches(skip_chunks=self.chunks_consumed)
        else:
            batches = self.training_batches()
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
        previous = signal.signal(signal.SIGINT, self._on_sigint) if self.is_main else None
        start = last_checkpoint = time.time()
        batches_this_pass = 1 if c.resume else 0
        progress.report("train", self.step, total_steps, force=True) if self.is_main else None
        bar = tqdm(total=total_steps, initial=self.step, unit="step", desc="training", dynamic_ncols=True, mininterval=1.0,
                   disable=not self.is_main)
        try:
            while self.step < total_steps:
                try:
                    batch = next(batches)
                    batches_this_pass += 1
                except StopIteration:  # a finite source ran out: start it again
                    if batches_this_pass == 0:
                        raise AtlasError("the training stream produced no tokens",
                                         "check the corpus and the split (--eval-fraction), or the activation file") from None
                    batches, batches_this_pass = self.training_batches(), 0
                    continue
                for run in self.runs:
                    out = self.train_step(run, batch[run.site], total_steps)
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
                if self.world > 1 and c.checkpoint_every_s > 0:  # every rank must agree on the step
                    flag = torch.tensor(int(due), device=self.device)
                    dist.broadcast(flag, 0)
                    due = bool(flag)
                if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or due:
                    self.save_checkpoint()
                    last_checkpoint = time.time()
                if self._stop_requested:
                    self.save_checkpoint()
                    raise Interrupted(f"training stopped at step {self.step}; checkpoint saved in {c.out}",
                                      "continue with the same command plus --resume")
        finally:
            bar.close()
            for fh in logs.values():
                fh.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.save_checkpoint()
        if not self.is_main:
            return []
        progress.report("evaluate", 0, 1, force=True)
        metrics = self.evaluate()
        for run in self.runs:
            save_sae(run.folder, run.sae, run.norm_scale, run.site, c.model if self.array is None else "activations",
                     training={**c.to_json(), "steps": self.step, "elapsed_s": time.time() - start,
                                         "world_size": self.world},
                     metrics=metrics[run.name], context_size=c.ctx_len, corpus=c.corpus if self.array is None else str(c.activations))
            (run.folder / "metrics.json").write_text(json.dumps(metrics[run.name], indent=2))
        return [r.folder for r in self.runs]

    def _log_record(self, run: Run, out: dict, start: float) -> dict:
        x, x_hat = out["x"], out["x_hat"].detach().float()
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
        record = {"step": self.step, "tokens": (self.step + 1) * self.cfg.batch_size, "loss": out["loss"], "fvu": fvu,
                  "l0": float(out["active"].sum(-1).float().mean()),
                  "dead_frac": float((run.tokens_since_fired >= run.sae.cfg.dead_after_tokens).float().mean()),
                  "lr": out["lr"], "elapsed_s": round(time.time() - start, 2)}
        record.update({k: v for k, v in out.items() if k not in ("x", "x_hat", "active", "loss", "lr")})
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict]:
        c = self.cfg
        held_out = self.eval_activations()
        models = [Evaluated(r.sae.eval(), r.site, r.norm_scale) for r in self.runs]
        metrics = {}
        for run, model in zip(self.runs, models):
            m = reconstruction_metrics(model, held_out[run.site])
            m["dead_frac"] = float((run.tokens_since_fired >= run.sae.cfg.dead_after_tokens).float().mean())
            m["dead_after_tokens"] = run.sae.cfg.dead_after_tokens
            m["train_tokens"] = self.step * c.batch_size
            m["norm_scale"] = run.norm_scale
            metrics[run.name] = m
        if self.lm is not None and c.ce_contexts > 0:
            contexts = self.eval_contexts()
            if contexts.shape[0]:
                ce = spliced_lm_loss(self.lm, models, contexts, c.exclude_bos, c.sink_norm_ratio)
                for i, run in enumerate(self.runs):
                    metrics[run.name].update(ce[i])
        return metrics


def train(cfg: TrainConfig, lm=None) -> list[Path]:
    """Train the SAE(s) described by cfg; returns their folders (empty on non-zero DDP ranks)."""
    try:
        return Trainer(cfg, lm).fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
