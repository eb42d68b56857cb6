"""Interoperability with the real libraries: SAELens and sparsify load what we save, we load what
they save, and the activations agree on the same inputs.

Run it with the PEERS' python (SAELens 6.54.12, eai-sparsify 1.3.3; see train_vs_peers.py's
peers_python); it calls our own venv's python for our side, so neither venv imports the other's code:

    /work/main/.peers/venv/bin/python benchmarks/peers/interop.py --ours-python .venv/bin/python

1. library -> ours: each library builds SAEs of every architecture it saves (SAELens: standard,
   topk, topk trained with rescale_acts_by_decoder_norm, jumprelu, gated, batchtopk and matryoshka
   as saved for inference, the four transcoder classes, apply_b_dec_to_input false, run-time
   layer_norm / constant_norm_rescale; sparsify: SAE, skip SAE, transcoder, skip transcoder), with
   random non-zero parameters, and saves them its own way (SAE.save_model /
   save_inference_model, SparseCoder.save_to_disk). The library's own reading of that folder
   (SAE.load_from_disk / SparseCoder.load_from_disk) gives the reference; trainer.formats.load_sae
   gives ours.
2. ours -> library: our venv saves SAEs of each of our architectures and transcoders (save_sae,
   `export --format sparsify`) and imports a Gemma Scope params.npz (`import`); the libraries load
   them and we compare with our own encode and output (the Gemma Scope import also with the
   release's tutorial formula).
Per case: max |f_lib - f_ours| over the latent activations, max |y_lib - y_ours| over the outputs
(an SAE's reconstruction, a transcoder's prediction), and how many latents switch on or off.
Writes benchmarks/results/interop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.machine here; our packages only in the --role read/make processes
from benchmarks.machine import cpu_model  # noqa: E402
D, F, K, N = 64, 256, 12, 512
SAELENS_HOOK, TC_IN, TC_OUT = "blocks.3.hook_resid_post", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"


def inputs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, D)) * 2.0 + rng.normal(size=D)).astype(np.float32)


def save_outputs(path: Path, f, y) -> None:
    np.savez(path, f=np.asarray(f, np.float32), y=np.asarray(y, np.float32))


# =============================== the libraries' side (peers venv) ===============================

def _randomise(module, seed: int, threshold_range=(0.0, 0.8)) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * (threshold_range[1] - threshold_range[0]) + threshold_range[0])
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.ndim == 2 else 0.5))


def saelens_cases() -> list[tuple[str, object, str]]:
    """(case name, an SAELens SAE with random parameters, how it is saved)."""
    import torch
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = lambda: SAEMetadata(model_name="gpt2", hook_name=SAELENS_HOOK)  # noqa: E731
    tmeta = lambda: SAEMetadata(model_name="gpt2", hook_name=TC_IN, hook_name_out=TC_OUT)  # noqa: E731
    out = []
    for apply in (True, False):
        tag = "" if apply else " (no b_dec on input)"
        out += [
            (f"standard{tag}", StandardSAE(StandardSAEConfig(D, F, apply_b_dec_to_input=apply, metadata=meta())), "save_model"),
            (f"topk{tag}", TopKSAE(TopKSAEConfig(D, F, apply_b_dec_to_input=apply, k=K, metadata=meta())), "save_model"),
            (f"jumprelu{tag}", JumpReLUSAE(JumpReLUSAEConfig(D, F, apply_b_dec_to_input=apply, metadata=meta())), "save_model"),
            (f"gated{tag}", GatedSAE(GatedSAEConfig(D, F, apply_b_dec_to_input=apply, metadata=meta())), "save_model"),
        ]
    for norm in ("layer_norm", "constant_norm_rescale"):
        out.append((f"jumprelu ({norm})", JumpReLUSAE(JumpReLUSAEConfig(D, F, normalize_activations=norm, metadata=meta())),
                    "save_model"))
        out.append((f"topk ({norm})", TopKSAE(TopKSAEConfig(D, F, k=K, normalize_activations=norm, metadata=meta())),
                    "save_model"))
    out.append(("topk, trained with decoder-norm rescaling",
                TopKTrainingSAE(TopKTrainingSAEConfig(D, F, k=K, rescale_acts_by_decoder_norm=True, metadata=meta())),
                "save_inference_model"))
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(D, F, k=K, metadata=meta()))
    mt = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(D, F, k=K, matryoshka_widths=[64, 128, F],
                                                                             metadata=meta()))
    out += [("batchtopk (saved as jumprelu)", bt, "save_inference_model"),
            ("matryoshka batchtopk (saved as jumprelu)", mt, "save_inference_model")]
    for cls, cfg_cls, name in ((Transcoder, TranscoderConfig, "transcoder"),
                               (SkipTranscoder, SkipTranscoderConfig, "skip_transcoder"),
                               (JumpReLUTranscoder, JumpReLUTranscoderConfig, "jumprelu_transcoder"),
                               (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, "jumprelu_skip_transcoder")):
        out.append((name, cls(cfg_cls(D, F, d_out=D, apply_b_dec_to_input=False, metadata=tmeta())), "save_model"))
    for i, (_, sae, _) in enumerate(out):
        _randomise(sae, seed=100 + i)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
    return out


def saelens_outputs(sae, x: np.ndarray):
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(x)
        return sae.encode(xt).numpy(), sae(xt).numpy()


def sparsify_coder(transcode: bool, skip: bool, seed: int):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D, SparseCoderConfig(k=K, num_latents=F, transcode=transcode, skip_connection=skip))
    _randomise(coder, seed)
    return coder


def sparsify_outputs(coder, x: np.ndarray):
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(x)
        acts, idx, _ = coder.encode(xt)
        f = torch.zeros(N, coder.num_latents).scatter_(-1, idx, acts)
        return f.numpy(), coder(xt).sae_out.numpy()


def compare(f_a, y_a, f_b, y_b) -> dict:
    return {"max_abs_diff_acts": float(np.abs(f_a - f_b).max()), "max_abs_diff_output": float(np.abs(y_a - y_b).max()),
            "latents_switched": int(((f_a > 0) != (f_b > 0)).sum()), "active": int((f_a > 0).sum()),
            "output_scale": float(np.abs(y_a).max())}


def run_ours(python: str, role: str, work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_ATLAS_DATA_DIR": str(work / "data")}
    subprocess.run([python, str(Path(__file__).resolve()), "--role", role, "--work", str(work)], check=True, env=env)


def peers_main(a) -> int:
    from importlib.metadata import version

    import torch
    from sae_lens import SAE
    from sparsify import SparseCoder

    started = time.time()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    work = Path(tempfile.mkdtemp(prefix="interop-"))
    x = inputs()
    np.save(work / "x.npy", x)
    cases: list[dict] = []

    # 1. library -> ours
    (work / "lib").mkdir()
    for i, (name, sae, how) in enumerate(saelens_cases()):
        folder = work / "lib" / f"saelens-{i}"
        getattr(sae, how)(folder)
        back = SAE.load_from_disk(folder)
        save_outputs(work / "lib" / f"saelens-{i}.npz", *saelens_outputs(back, x))
        cases.append({"case": name, "direction": "SAELens -> ours", "folder": str(folder),
                      "reference": str(work / "lib" / f"saelens-{i}.npz"), "library_class": type(back).__name__})
    for i, (name, transcode, skip, hook) in enumerate([("sae", False, False, "layers.3"),
                                                       ("sae with skip connection", False, True, "layers.3"),
                                                       ("transcoder", True, False, "layers.3.mlp"),
                                                       ("skip transcoder", True, True, "layers.3.mlp")]):
        folder = work / "lib" / f"sparsify-{i}" / hook
        sparsify_coder(transcode, skip, seed=200 + i).save_to_disk(folder)
        back = SparseCoder.load_from_disk(folder)
        save_outputs(work / "lib" / f"sparsify-{i}.npz", *sparsify_outputs(back, x))
        cases.append({"case": name, "direction": "sparsify -> ours", "folder": str(folder),
                      "reference": str(work / "lib" / f"sparsify-{i}.npz"), "library_class": "SparseCoder"})
    (work / "lib_cases.json").write_text(json.dumps(cases))
    run_ours(a.ours_python, "read", work)
    for c in cases:
        lib, ours = np.load(c["reference"]), np.load(c["folder"] + ".ours.npz")
        c.update(compare(lib["f"], lib["y"], ours["f"], ours["y"]))

    # 2. ours -> library
    run_ours(a.ours_python, "make", work)
    made = json.loads((work / "ours_cases.json").read_text())
    for c in made:
        ours = np.load(c["outputs"])
        if c["load_with"] == "saelens":
            sae = SAE.load_from_disk(c["folder"])
            f, y = saelens_outputs(sae, x)
            c["library_class"] = type(sae).__name__
            c["model_name"] = json.loads((Path(c["folder"]) / "cfg.json").read_text()).get("model_name")
        else:
            coder = SparseCoder.load_from_disk(c["folder"])
            f, y = sparsify_outputs(coder, x)
            c["library_class"] = "SparseCoder"
        c.update(compare(f, y, ours["f"], ours["y"]))
        if c.get("gemma_scope"):
            p = np.load(c["gemma_scope"])
            pre = x @ p["W_enc"] + p["b_enc"]
            f_gs = (pre > p["threshold"]) * np.maximum(pre, 0)
            c["vs_gemma_scope_formula"] = compare(f, y, f_gs, f_gs @ p["W_dec"] + p["b_dec"])
        cases.append(c)

    rows = [(c["direction"], c["case"], c["library_class"], c["max_abs_diff_acts"], c["max_abs_diff_output"],
             c["latents_switched"]) for c in cases]
    print(f"\n{'direction':18} {'case':48} {'library class':24} {'max|Δf|':>9} {'max|Δy|':>9} {'switched':>8}")
    for r in rows:
        print(f"{r[0]:18} {r[1]:48} {r[2]:24} {r[3]:9.2e} {r[4]:9.2e} {r[5]:8d}")
    names = sorted({c["model_name"] for c in cases if c.get("model_name")})
    print(f"model_name in the cfg.json we write: {', '.join(names)}")
    gs = [c for c in cases if c.get("gemma_scope")]
    for c in gs:
        v = c["vs_gemma_scope_formula"]
        print(f"Gemma Scope params.npz imported, then read by SAELens vs the release's formula: "
              f"max|Δf| {v['max_abs_diff_acts']:.2e}, max|Δy| {v['max_abs_diff_output']:.2e}, switched {v['latents_switched']}")
    worst = max(max(c["max_abs_diff_acts"], c["max_abs_diff_output"]) for c in cases)
    switched = sum(c["latents_switched"] for c in cases)
    print(f"\n{len(cases)} cases; worst max abs difference {worst:.2e}; latents switched in total: {switched}")
    result = {
        "benchmark": "interop", "command": "PEERS_PYTHON benchmarks/peers/interop.py --ours-python OURS_PYTHON",
        "sizes": {"d_in": D, "d_sae": F, "k": K, "inputs": N},
        "versions": {"sae-lens": version("sae-lens"), "eai-sparsify": version("eai-sparsify"), "torch": torch.__version__},
        "machine": {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "cpu": cpu_model(), "python": platform.python_version()},
        "worst_max_abs_diff": worst, "latents_switched": switched, "seconds": round(time.time() - started, 1),
        "cases": cases,
    }
    for c in cases:  # paths into the temporary folder mean nothing afterwards
        for key in ("folder", "reference", "outputs", "load_with"):
            c.pop(key, None)
        if c.get("gemma_scope"):
            c["gemma_scope"] = True
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst < a.tolerance and switched == 0 else 1


# =============================== our side (our venv) ============================================

def ours_read(work: Path) -> None:
    import torch

    from trainer.formats import load_sae

    x = torch.from_numpy(np.load(work / "x.npy"))
    for c in json.loads((work / "lib_cases.json").read_text()):
        loaded = load_sae(c["folder"])
        with torch.no_grad():
            save_outputs(Path(c["folder"] + ".ours.npz"), loaded.sae.encode_dense(x).numpy(), loaded.sae(x).numpy())


def _trained_like(arch: str, seed: int, transcoder_skip: bool = False, norm: str = "none"):
    import torch

    from trainer.formats import SiteIO
    from trainer.sae import SAEConfig, build_sae

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=K))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.6)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
    if transcoder_skip or norm != "none":
        sae.io = SiteIO(norm, restore_output=True, w_skip=torch.randn(D, D) * 0.1 if transcoder_skip else None)
    return sae.eval()


def ours_make(work: Path) -> None:
    import torch

    from trainer.formats import export_folder, save_sae
    from trainer.importer import import_sae

    x = torch.from_numpy(np.load(work / "x.npy"))
    base = work / "ours"
    base.mkdir()
    cases = []

    def record(name, folder, load_with, sae, scale=1.0, **extra):
        out = base / f"{len(cases)}.npz"
        with torch.no_grad():
            save_outputs(out, sae.encode_dense(x * scale).numpy(), (sae(x * scale) / scale).numpy())
        cases.append({"case": name, "direction": f"ours -> {'SAELens' if load_with == 'saelens' else 'sparsify'}",
                      "folder": str(folder), "load_with": load_with, "outputs": str(out), **extra})

    for i, arch in enumerate(("topk", "batchtopk", "jumprelu", "relu", "matryoshka")):
        sae, c = _trained_like(arch, seed=i), 1.7  # trained on inputs scaled by c: saved to read raw x
        save_sae(base / arch, sae, c, "resid_post.3", "smollm2-135m")
        record(arch, base / arch, "saelens", sae, scale=c)
    record("topk, exported --format sparsify", export_folder(base / "topk", "sparsify", base / "sparsify" / "layers.3"),
           "sparsify", _loaded(base / "topk"))
    ln = _trained_like("jumprelu", seed=9, norm="layer_norm")
    save_sae(base / "jumprelu-ln", ln, 1.0, "resid_post.3", "smollm2-135m")
    record("jumprelu (layer_norm)", base / "jumprelu-ln", "saelens", ln)
    for arch, skip, name in (("relu", False, "relu transcoder"), ("jumprelu", True, "jumprelu skip transcoder"),
                             ("topk", False, "topk transcoder")):
        sae = _trained_like(arch, seed=20 + len(name), transcoder_skip=skip)
        folder = base / name.replace(" ", "-")
        save_sae(folder, sae, 1.0, "mlp_in.3", "smollm2-135m", output_site="mlp_out.3")
        record(name, folder, "saelens", sae)
    for name, skip in (("topk transcoder", False), ("topk skip transcoder", True)):
        sae = _trained_like("topk", seed=40 + skip, transcoder_skip=skip)
        folder = base / (name.replace(" ", "-") + "-src")
        save_sae(folder, sae, 1.0, "mlp_in.3", "smollm2-135m", output_site="mlp_out.3")
        out = export_folder(folder, "sparsify", base / "sparsify" / name.replace(" ", "-") / "layers.3.mlp")
        record(f"{name}, exported --format sparsify", out, "sparsify", sae)
    # a Gemma Scope release file through `sae-atlas import`
    rng = np.random.default_rng(7)
    npz = work / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_20" / "params.npz"
    npz.parent.mkdir(parents=True)
    np.savez(npz, W_enc=rng.normal(0, 0.15, (D, F)).astype(np.float32), W_dec=rng.normal(0, 0.15, (F, D)).astype(np.float32),
             b_enc=rng.normal(0, 0.5, F).astype(np.float32), b_dec=rng.normal(0, 1.0, D).astype(np.float32),
             threshold=rng.uniform(0.0, 1.0, F).astype(np.float32))
    folder = import_sae(npz, "google/gemma-2-2b", None, "gemma-scope-l3")
    record("Gemma Scope params.npz, imported", folder, "saelens", _loaded(folder), gemma_scope=str(npz))
    (work / "ours_cases.json").write_text(json.dumps(cases))


def _loaded(folder):
    from trainer.formats import load_sae

    return load_sae(folder).sae


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="our venv's python (runs our side in a subprocess)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interop.json"))
    p.add_argument("--tolerance", type=float, default=1e-4, help="exit non-zero above this max abs difference")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of saved SAEs")
    p.add_argument("--role", choices=["peers", "read", "make"], default="peers", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "peers":
        return peers_main(a)
    (ours_read if a.role == "read" else ours_make)(Path(a.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
