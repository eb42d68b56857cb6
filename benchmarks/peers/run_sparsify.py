"""Train EleutherAI sparsify's TopK SAE on the benchmark's cached activations (runs in the peers venv).

sparsify has no way to train from cached activations: its `Trainer(cfg, dataset, model)` runs a
Hugging Face model over `input_ids` and trains the SAEs inside a forward hook on the chosen
submodule. To drive *its own* training loop unchanged (its SparseCoder with the fused TopK encoder
and sparse decoder, its hook that sets b_dec to the first batch's mean, renormalises W_dec and
computes FVU + AuxK, its removal of the decoder-parallel gradient, its Adam + warm-up/linear-decay
scheduler, its dead-latent counters), we give it a stand-in "model":

- the dataset holds one item per optimiser step whose `input_ids` are the 4096 row indices of that
  step's batch (the benchmark's shared `order.npy`), with sparsify's `batch_size` = 1 sequence;
- the model's forward looks those rows up in the memmapped activation matrix, giving a
  [1, 4096, D] tensor, and passes it through an `nn.Identity` registered at `layers.0`, the
  hookpoint we ask sparsify to train on.

So sparsify's hook receives exactly the activations a real LM would have produced at that site,
4096 tokens per step, and everything after the hook is sparsify's own code. Nothing of the real LM
runs, just as in the other two trainers. Settings that match ours: optimizer="adam" (torch Adam,
bitsandbytes is not installed), the job's lr (our default for the run length; sparsify's own
default is Gao et al.'s width law 2e-4 / sqrt(width / 2^14), which ours raises for short runs),
lr_warmup_steps = our warm-up, auxk_alpha = 1/32 (sparsify's default; its AuxK
is normalised by the residual's variance, as ours), dead_feature_threshold = our dead_after_tokens,
normalize_decoder=True, k, width. What stays sparsify's own (no option): raw (un-normalised)
inputs, b_dec initialised at the first batch's mean, Kaiming-uniform encoder with W_dec =
normalised W_enc, its schedule (transformers' get_linear_schedule_with_warmup: linear decay to 0
over the whole run after warm-up) and no gradient clipping; train_vs_peers.py therefore compares
sparsify with our trainer run on that same schedule without clipping.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import Batches, load_job, save_check, write_result  # noqa: E402


class StepDataset(torch.utils.data.Dataset):
    """One item per optimiser step: the row indices of that step's batch, as `input_ids`."""

    def __init__(self, order: np.ndarray):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.from_numpy(self.order[i])}


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity()])


class ActivationTableModel(nn.Module):
    """Stands in for the LM: input_ids are row indices into the cached activation matrix."""

    def __init__(self, batches: Batches, device: str = "cpu"):
        super().__init__()
        self.batches = batches
        self.base_model = _Base()
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
        self._device = torch.device(device)
        self.step_starts: list[float] = []
        self.first_cpu: float | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, input_ids: torch.Tensor, **_):
        if input_ids.shape[-1] > 1:  # a training step begins (sparsify's dummy forward has one token)
            if self.first_cpu is None:
                self.first_cpu = time.process_time()
            self.step_starts.append(time.perf_counter())
        rows = self.batches.rows(input_ids.reshape(-1).cpu().numpy())
        acts = torch.from_numpy(rows).reshape(*input_ids.shape, rows.shape[-1]).to(self._device)
        return self.base_model.layers[0](acts)


def main() -> int:
    job = load_job()
    torch.manual_seed(job["seed"])
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    batches = Batches(job)
    model = ActivationTableModel(batches, job.get("device", "cpu"))
    cfg = TrainConfig(
        SparseCoderConfig(activation="topk", num_latents=job["width"], k=job["k"], normalize_decoder=True,
                          multi_topk=False, skip_connection=False, transcode=False),
        batch_size=1,  # one "sequence" = one step's 4096 tokens
        grad_acc_steps=1,
        micro_acc_steps=1,
        loss_fn="fvu",
        optimizer="adam",
        lr=job["lr"],
        lr_warmup_steps=job["warmup_steps"],
        auxk_alpha=job["aux_alpha"],
        dead_feature_threshold=job["dead_tokens"],
        hookpoints=["layers.0"],
        init_seeds=[job["seed"]],
        save_every=10**9,  # only the final save (excluded from the timed loop below)
        log_to_wandb=False,
        run_name="sae",
        save_dir=job["out"],
    )
    trainer = Trainer(cfg, StepDataset(batches.order), model)

    loop_end: list[tuple[float, float]] = []
    save = trainer.save

    def timed_save():  # sparsify calls save() once, right after its last optimiser step
        loop_end.append((time.perf_counter(), time.process_time()))
        save()

    trainer.save = timed_save
    trainer.fit()
    cpu_s = loop_end[0][1] - model.first_cpu
    sae = trainer.saes["layers.0"]
    out = Path(job["out"]) / "sae" / "layers.0"
    assert (out / "sae.safetensors").is_file(), out
    steps = len(batches)
    with torch.no_grad():
        save_check(job, lambda x: sae(torch.from_numpy(x).to(model.device)).sae_out.float().cpu().numpy())
    write_result(job, {
        "trainer": "sparsify",
        "package": "eai-sparsify",
        "version": version("eai-sparsify"),
        "torch": torch.__version__,
        "weights": str(out),
        "format": "sparsify",
        "steps": steps,
        "tokens": steps * job["batch_size"],
        "step_starts": model.step_starts,
        "loop_end": loop_end[0][0],
        "cpu_s": cpu_s,
        "fetch_s": batches.fetch_s,
        "own_dead_frac": float((trainer.num_tokens_since_fired["layers.0"] > cfg.dead_feature_threshold).float().mean()),
        "num_latents": sae.num_latents,
        "threads": torch.get_num_threads(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
