"""Every architecture's defaults have one home (SAEConfig / TrainConfig) and give a working SAE through
every way users start a run: `sae-atlas train` flags, a TOML file, the runs API (RunSpec) and the
run form. The dead fraction is measured the same way for every architecture.

Each architecture is trained twice on a small synthetic problem (d = 32, 96 true directions, about
4 active per row, 64 latents): once through the CLI's main() with --activations, once through the path the
trainer worker takes (RunSpec -> train_config -> train). Only the problem's size is given (width,
k, tokens, batch size), never a coefficient, so the checks are on the defaults themselves; the two
SAEs must be identical, and each must reconstruct (FVU well below 1) with few dead latents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from app.cli.flags import build_config, load_toml
from app.runs.spec import RunSpec
from trainer.config import ARCH_SETTINGS, ARCHITECTURES, TrainConfig
from trainer.sae import SAEConfig, build_sae
from trainer.synthetic import superposition_data
from trainer.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = {"width": 64, "k": 6, "tokens": 102_400, "batch_size": 512}
# Fewer latents (64) than true directions (96), so that every latent of a working SAE has work to
# do and a dead fraction means something. Measured with these sizes, seeds 0-1 (held-out FVU / L0 /
# dead in the training window / dead on held-out rows):
#   topk 0.161-0.168 / 5.9 / 0-3% / 0-5%, batchtopk 0.133-0.137 / 5.9 / 2% / 2-5%,
#   jumprelu 0.135-0.144 / 6.2 / 3% / 3-8%, relu 0.183 / 7.7-7.9 / 0% / 0%,
#   matryoshka 0.187-0.208 / 6.0 / 6-8% / 13-14%.
# The old ReLU default (L1 2.0) ended at FVU 1.0; the bounds leave room for other machines' float
# rounding, not for a broken default.
MAX_FVU = {"topk": 0.25, "batchtopk": 0.25, "jumprelu": 0.25, "relu": 0.25, "matryoshka": 0.27}
MAX_DEAD, MAX_DEAD_EVAL = 0.15, 0.2


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    x, _ = superposition_data(40_000, d=32, n_features=96, mean_active=4.0, seed=3)
    path = tmp_path_factory.mktemp("defaults") / "acts.npy"
    np.save(path, x)
    return path


def cli_flags(arch: str, acts: Path, out: Path) -> list[str]:
    return ["train", "--arch", arch, "--activations", str(acts), "--site", "resid_post.0", "--out", str(out),
            "--width", str(SIZE["width"]), "--k", str(SIZE["k"]), "--tokens", str(SIZE["tokens"]),
            "--batch-size", str(SIZE["batch_size"]), "--device", "cpu"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def test_architecture_settings_have_one_home():
    """TrainConfig carries no coefficient of its own: unset, SAEConfig's default is used."""
    defaults = TrainConfig()
    for name in ARCH_SETTINGS:
        assert getattr(defaults, name) in (None, []), name
    sae_defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.default is not dataclasses.MISSING}
    for arch in ARCHITECTURES:
        cfg = TrainConfig(arch=[arch], width=[256], k=[8])
        ((_, made),) = cfg.sae_configs(32)
        for name in ("l1_coefficient", "l0_coefficient", "target_l0_coefficient", "jumprelu_bandwidth",
                     "jumprelu_init_threshold", "aux_coefficient"):
            assert getattr(made, name) == sae_defaults[name], (arch, name)


def test_form_api_toml_and_flags_give_the_same_train_config(tmp_path):
    """The run form's untouched fields, RunSpec's defaults, and the CLI/TOML defaults are one config."""
    from app.web.run_pages import form_values, spec_data

    api = RunSpec()
    form = RunSpec.model_validate(spec_data(form_values()))
    assert form.model_dump() == api.model_dump()
    out = tmp_path / "x"
    from_api = api.train_config(out)
    from_cli = build_config(TrainConfig, {"out": str(out)})
    toml = tmp_path / "run.toml"
    toml.write_text(f'out = "{out}"\n')
    from_toml = build_config(TrainConfig, load_toml(str(toml)))
    assert from_api == from_cli == from_toml
    # and a user's coefficient takes the same road everywhere
    spec = RunSpec(arch=["relu"], l1_coefficient=0.5)
    assert spec.train_config(out).sae_configs(32)[0][1].l1_coefficient == 0.5
    assert build_config(TrainConfig, {"arch": "relu", "l1_coefficient": "0.5"}).sae_configs(32)[0][1].l1_coefficient == 0.5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_defaults_train_a_working_sae_through_the_cli_and_the_runs_api(arch, acts, tmp_path):
    assert main(cli_flags(arch, acts, tmp_path / "cli")) == 0
    spec = RunSpec(arch=[arch], sites=["resid_post.0"], width=[SIZE["width"]], k=[SIZE["k"]], tokens=SIZE["tokens"],
                   batch_size=SIZE["batch_size"], device="cpu")
    # what app.runs.child does, with the activation file standing in for the LM
    (folder,) = train(spec.train_config(tmp_path / "api", activations=acts, log_every=1000))
    m_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    m_api = json.loads((folder / "metrics.json").read_text())
    w_cli, w_api = weights(tmp_path / "cli"), weights(folder)
    assert all(torch.equal(w_cli[k], w_api[k]) for k in w_cli), "the CLI and the runs API trained different SAEs"
    summary = f"{arch}: FVU {m_cli['fvu']:.3f} L0 {m_cli['l0']:.2f} dead {m_cli['dead_frac']:.1%}"
    assert m_cli["fvu"] == m_api["fvu"] and m_cli["fvu"] <= MAX_FVU[arch], summary
    assert m_cli["dead_frac"] <= MAX_DEAD and m_cli["dead_frac_eval"] <= MAX_DEAD_EVAL, summary
    if arch in ("topk", "batchtopk", "matryoshka", "jumprelu"):  # JumpReLU aims its L0 at k by default
        assert SIZE["k"] * 0.6 <= m_cli["l0"] <= SIZE["k"] * 1.5, summary
    else:
        assert 1 <= m_cli["l0"] <= SIZE["width"] / 2, summary


def silence(sae) -> None:
    """Make an SAE that never fires (for ReLU also the degenerate way: positive codes, ~0 decoder)."""
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(1e4)
        if sae.architecture == "relu":
            sae.b_enc.fill_(10.0)  # every f_i > 0 ...
            sae.W_dec.mul_(1e-9)  # ... but no latent contributes anything


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_an_sae_that_never_fires_is_100_percent_dead(arch, acts, tmp_path):
    cfg = TrainConfig(out=tmp_path / arch, activations=acts, site=["resid_post.0"], arch=[arch], width=[64], k=[4],
                      tokens=2048, batch_size=512, lr=1e-12, device="cpu", ce_contexts=0, eval_tokens=2048)
    trainer = Trainer(cfg)
    trainer.build_runs(trainer.load_inputs())
    (run,) = trainer.runs
    batches = [torch.from_numpy(np.load(acts)[i * 512:(i + 1) * 512]) for i in range(3)]
    trainer.initialise({"resid_post.0": batches[0]})
    silence(run.sae)
    for x in batches:
        trainer.train_step(run, x)
        trainer.step += 1
    assert bool(trainer.dead_mask(run).all())  # the window is the 1536 tokens seen so far
    metrics = trainer.evaluate()[run.name]
    assert metrics["dead_frac"] == 1.0 and metrics["dead_frac_eval"] == 1.0 and metrics["dense_frac"] == 0.0
    assert metrics["fvu"] >= 0.99


def test_firing_is_the_same_rule_for_every_architecture():
    """A latent fires where its contribution f_i * ||W_dec,i|| is above the floor, whatever made f_i."""
    for arch in ARCHITECTURES:
        sae = build_sae(SAEConfig(d_in=16, d_sae=32, architecture=arch, k=4))
        with torch.no_grad():
            sae.W_dec[0].mul_(1e-9)
        from trainer.sae import Codes

        codes = Codes(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0, 1, 2]]))
        assert sae.fires(codes).tolist() == [[False, True, False]], arch
