"""Train SAELens's TopK SAE on the benchmark's cached activations (runs in the peers venv).

SAELens's training loop is `sae_lens.training.sae_trainer.SAETrainer(cfg, sae, data_provider)`:
`LanguageModelSAETrainingRunner` only builds a TransformerLens model and an ActivationsStore (from
the LM or from an activation cache in its own Hugging Face datasets layout) and hands the store to
SAETrainer as a plain iterator of [batch, d_in] tensors (`DataProvider = Iterator[Tensor]`, the seam
the library documents for external coordinators). We hand SAETrainer an iterator over the
benchmark's shared batches instead, so the whole training loop is SAELens's own: its
TopKTrainingSAE (dense TopK, decoder-norm-rescaled activations, AuxK), its ActivationScaler
("expected_average_only_in": mean norm -> sqrt(d_in), estimated from the data provider and folded
into the weights at the end), its Adam, warm-up + constant + linear-decay scheduler, gradient
clipping at 1.0, and its dead-latent window.

The norm is estimated from ONE batch (n_batches_for_norm_estimate=1), the same first batch our
trainer estimates its scale from; that batch is served once more as the first training batch, so
SAELens trains on exactly the same 4096-token batches, in the same order, as the other trainers.

Settings that match ours (the job's): k, width, the learning rate, the schedule (warm-up from lr/W,
constant, linear decay to 0 over the job's decay steps: SAELens's "constant" scheduler with
lr_warm_up_steps and lr_decay_steps), Adam betas (0.9, 0.999), clipping at 1.0 (fixed in
SAETrainer), dead window = the job's dead tokens / batch size, float32 without autocast.

Its documented working regime, kept: aux_loss_coefficient = 1.0, SAELens's default. Its AuxK loss is
NOT divided by the residual's variance (sae_lens/saes/topk_sae.py calculate_topk_aux_loss: "without
variance normalization"), so Gao et al.'s alpha = 1/32, which assumes the normalised form, made the
auxiliary gradient ~30x weaker than SAELens intends: the previous version of this benchmark passed
1/32 and SAELens ended with 78.9% of its latents dead. Also its own: b_dec initialised at zero,
W_dec initialised at norm 0.1 with W_enc = W_dec^T, the decoder kept free and its norm folded into
the activations (rescale_acts_by_decoder_norm=True, the TopK default), MSE summed over dimensions.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import Batches, load_job, save_check, write_result  # noqa: E402


def main() -> int:
    job = load_job()
    torch.manual_seed(job["seed"])
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    batches = Batches(job)
    steps = len(batches)
    step_starts: list[float] = []
    marks: dict[str, float] = {}

    def provider():
        yield torch.from_numpy(batches.batch(0))  # consumed by the norm estimate
        marks["cpu"] = time.process_time()
        for step in range(steps):
            step_starts.append(time.perf_counter())  # SAETrainer asks for a batch as each step begins
            yield torch.from_numpy(batches.batch(step)).to(device)

    device = job.get("device", "cpu")
    sae_cfg = TopKTrainingSAEConfig(
        d_in=job["d_in"], d_sae=job["width"], k=job["k"], dtype="float32", device=device,
        normalize_activations="expected_average_only_in",  # aux_loss_coefficient: SAELens's default, 1.0
        # use_sparse_activations stays False (the default): with the default
        # rescale_acts_by_decoder_norm=True its backward fails on CPU in sae-lens 6.54.12
        # ("aten::view ... SparseCPU"), so the dense path is SAELens's only working TopK path here.
    )
    sae = TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * job["batch_size"],
        train_batch_size_samples=job["batch_size"],
        lr=job["lr"],
        lr_end=job["lr"] / 10,  # what LanguageModelSAERunnerConfig sets; the constant schedule ignores it
        lr_scheduler_name="constant",
        lr_warm_up_steps=job["warmup_steps"],
        lr_decay_steps=job["decay_steps"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=device,
        autocast=False,
        dead_feature_window=max(1, round(job["dead_tokens"] / job["batch_size"])),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider())
    sae = trainer.fit()
    loop_end, cpu_s = time.perf_counter(), time.process_time() - marks["cpu"]
    out = Path(job["out"]) / "sae"
    sae.save_inference_model(out)
    sae.eval()
    with torch.no_grad():
        save_check(job, lambda x: sae(torch.from_numpy(x).to(device)).float().cpu().numpy())
    write_result(job, {
        "trainer": "saelens",
        "package": "sae-lens",
        "version": version("sae-lens"),
        "torch": torch.__version__,
        "weights": str(out),
        "format": "saelens",
        "steps": trainer.n_training_steps,
        "tokens": trainer.n_training_samples,
        "step_starts": step_starts,
        "loop_end": loop_end,
        "cpu_s": cpu_s,
        "fetch_s": batches.fetch_s,
        "aux_loss_coefficient": sae_cfg.aux_loss_coefficient,
        "own_dead_frac": float(trainer.dead_neurons.float().mean()),
        "use_sparse_activations": sae_cfg.use_sparse_activations,
        "threads": torch.get_num_threads(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
