"""Attribution speed against circuit-tracer 0.5.0 on the same machine, model, transcoders, prompt and
caps, in alternating rounds: our `trainer.circuits.attribute` against circuit-tracer's `attribute`.

Run it with the PEERS' python (circuit-tracer installed there); our side runs in our venv's python
as a child process that loads once and then attributes on request, so neither venv imports the
other's code and neither side's load time is counted:

    /work/main/.peers/venv/bin/python benchmarks/peers/circuit_tracer_speed.py \
        --ours-python /work/main/.venv/bin/python --random 4608 64 --layers 4 --threads 1

1. ours (--make): trainer.lm.load_lm(--model) on the CPU in float32 (for the bundled alias that is
   the GGUF converted once to a transformers Llama folder, which circuit-tracer then loads too, offline);
   the prompt cut or repeated to --tokens tokens (BOS first, not counted); the transcoders, written
   as circuit-tracer's SingleLayerTranscoder tensors (W_enc, W_dec [F, D], b_enc, b_dec):
   --random W K: random TopK transcoders of width W keeping K latents (benchmarks/circuits.py's
   random_set, with b_dec = 0; timing only, the graph's size is that of a trained set at L0 = K), or
   --transcoders DIR: a folder of our TopK transcoder folders, one per block (circuit-tracer encodes
   W_enc x + b_enc, ours W_enc (x - b_dec) + b_enc', so b_enc = b_enc' - W_enc b_dec).
2. circuit-tracer: that folder in a TransformerLens HookedTransformer (transformer_lens's own
   convert_llama_weights, as circuit_tracer_conformance.py), TransformerLensReplacementModel with a
   TranscoderSet on mlp.hook_in -> mlp.hook_out, then attribute() and prune_graph().
3. ours (--serve): the same folder through load_lm, the same tensors as our TopK SAEs,
   trainer.circuits.attribute and prune.
--layers N keeps the first N blocks on both sides. Both sides get the same max_feature_nodes,
batch_size, max_n_logits, desired_logit_prob and update_interval. Each round runs both, the order
alternating; reported: per-round seconds, medians, the ratio circuit-tracer / ours, the load
average around each run, CPU model, threads, dtype. Writes benchmarks/results/circuit_tracer_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
K_DEFAULT = 64


# --- our side ---------------------------------------------------------------------------------

def _truncate(lm, layers: int | None):
    if layers is not None:
        del lm.blocks[layers:]
        lm.model.config.num_hidden_layers = layers
    return lm


def make(folder: Path, model: str, layers: int | None, tokens: int, random: list[int] | None,
         transcoders: Path | None) -> None:
    from safetensors.torch import save_file

    from benchmarks.circuits import PROMPT, random_set
    from trainer.lm import load_lm

    lm = _truncate(load_lm(model, "cpu", "float32"), layers)
    model_dir = Path(lm.model.name_or_path)
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = [lm.bos_token_id] + (ids * (tokens // len(ids) + 1))[:tokens]
    out = folder / "transcoders"
    out.mkdir(parents=True)
    if random is not None:
        width, k = random
        saes = [tc.sae for tc in random_set(lm, width, k)]
    else:
        from trainer.formats import load_sae

        loaded = {}
        for p in sorted(transcoders.iterdir()):
            if p.is_dir():
                item = load_sae(p)
                layer = int(str(item.site).split(".")[-1])
                if layer < lm.n_layers:
                    loaded[layer] = item
        missing = [L for L in range(lm.n_layers) if L not in loaded]
        if missing:
            raise SystemExit(f"{transcoders} lacks transcoders for blocks {missing}")
        saes = [loaded[L].sae for L in range(lm.n_layers)]
        bad = [s.cfg.architecture for s in saes if s.cfg.architecture != "topk"]
        if bad:
            raise SystemExit(f"only TopK transcoders are converted for circuit-tracer here, not {sorted(set(bad))}")
        k = saes[0].cfg.k
        width = saes[0].cfg.d_sae
    for layer, sae in enumerate(saes):
        W_enc = sae.W_enc.detach().float().clone()
        b_dec = sae.b_dec.detach().float().clone()
        tensors = {"W_enc": W_enc, "W_dec": sae.W_dec.detach().float().clone(),
                   "b_enc": sae.b_enc.detach().float() - W_enc @ b_dec, "b_dec": b_dec}
        w_skip = getattr(sae.io, "W_skip", None)
        if w_skip is not None:  # [d_out, d_in], circuit-tracer's layout too (it adds x @ W_skip.T)
            tensors["W_skip"] = w_skip.detach().float().clone()
        save_file(tensors, str(out / f"layer_{layer}.safetensors"))
    (folder / "job.json").write_text(json.dumps({"tokens": ids, "model_dir": str(model_dir), "model": model,
                                                 "n_layers": lm.n_layers, "width": width, "k": k}))


def serve(folder: Path, threads: int, cfg_json: str) -> None:
    """Load once, then attribute each time a line arrives on stdin; one JSON line out per run."""
    import torch
    from safetensors.torch import load_file

    from trainer.circuits.attribute import AttributionConfig, attribute
    from trainer.circuits.prune import prune
    from trainer.circuits.replacement import ReplacementModel
    from trainer.lm import load_lm

    from circuit_tracer_conformance import our_transcoder

    torch.set_num_threads(threads)
    job = json.loads((folder / "job.json").read_text())
    lm = _truncate(load_lm(job["model"], "cpu", "float32"), job["n_layers"])
    tcs = [our_transcoder(load_file(str(folder / "transcoders" / f"layer_{layer}.safetensors")), lm.d_model,
                          job["width"], "topk", job["k"], layer) for layer in range(lm.n_layers)]
    rm = ReplacementModel(lm, tcs)
    cfg = AttributionConfig(**json.loads(cfg_json))
    print(json.dumps({"ready": True}), flush=True)
    for _line in sys.stdin:
        start = time.perf_counter()
        graph = attribute(job["tokens"], rm, cfg)
        t_attr = time.perf_counter() - start
        start = time.perf_counter()
        pruned = prune(graph)
        t_prune = time.perf_counter() - start
        print(json.dumps({"attribute_s": t_attr, "prune_s": t_prune, "active_features": len(graph.active_features),
                          "feature_nodes": graph.n_features, "nodes": graph.n_nodes,
                          "kept_nodes": int(pruned.node_mask.sum())}), flush=True)


# --- circuit-tracer's side ----------------------------------------------------------------------

def circuit_tracer_model(folder: Path):
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False  # gone from huggingface_hub 2.x
    import torch
    import transformers
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from safetensors.torch import load_file
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    from circuit_tracer_conformance import tl_config

    job = json.loads((folder / "job.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    del hf.model.layers[job["n_layers"]:]
    hf.config.num_hidden_layers = job["n_layers"]
    tok = transformers.AutoTokenizer.from_pretrained(job["model_dir"])
    cfg = tl_config(hf.config, hf.config.vocab_size, job["model_dir"])
    tcs = {}
    for layer in range(cfg.n_layers):
        t = load_file(str(folder / "transcoders" / f"layer_{layer}.safetensors"))
        tc = SingleLayerTranscoder(cfg.d_model, job["width"], TopK(job["k"]), layer, skip_connection="W_skip" in t,
                                   device=torch.device("cpu"), dtype=torch.float32)
        tc.load_state_dict(t)
        tcs[layer] = tc
    tset = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="speed")
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tok)
    state = {}
    for key, value in convert_llama_weights(hf, cfg).items():
        key = key.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed.")
        state[key] = value.detach().clone()
    _missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    tokens = torch.tensor(job["tokens"])
    with torch.no_grad():
        gap = float((model(tokens[None])[0] - hf(input_ids=tokens[None]).logits[0]).abs().max())
    del hf
    return model, tokens, gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", nargs=2, type=int, metavar=("WIDTH", "K"))
    ap.add_argument("--transcoders", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="keep the first N blocks on both sides")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-feature-nodes", type=int, default=7500)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "circuit_tracer_speed.json")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make(args.make, args.model, args.layers, args.tokens, args.random, args.transcoders)
    if args.serve:
        return serve(args.serve, args.threads, args.config)
    if (args.random is None) == (args.transcoders is None):
        ap.error("give one of --random WIDTH K and --transcoders DIR")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(args.threads)
    shared = {"max_feature_nodes": args.max_feature_nodes, "batch_size": args.batch_size, "max_n_logits": 10,
              "desired_logit_prob": 0.95, "update_interval": 4}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ct-speed-") as tmp:
        folder = Path(tmp)
        make_cmd = [args.ours_python, __file__, "--make", str(folder), "--model", args.model, "--tokens", str(args.tokens)]
        make_cmd += ["--random", *map(str, args.random)] if args.random else ["--transcoders", str(args.transcoders)]
        make_cmd += ["--layers", str(args.layers)] if args.layers is not None else []
        subprocess.run(make_cmd, check=True, env=env, cwd=REPO)
        job = json.loads((folder / "job.json").read_text())
        ours = subprocess.Popen([args.ours_python, __file__, "--serve", str(folder), "--threads", str(args.threads),
                                 "--config", json.dumps(shared)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=REPO)
        try:
            assert json.loads(ours.stdout.readline()).get("ready")
            from circuit_tracer.attribution.attribute import attribute
            from circuit_tracer.graph import prune_graph

            model, tokens, gap = circuit_tracer_model(folder)

            def run_ct() -> dict:
                start = time.perf_counter()
                graph = attribute(tokens, model, **shared)
                t_attr = time.perf_counter() - start
                start = time.perf_counter()
                node_mask, _edge_mask, _cum = prune_graph(graph)
                return {"attribute_s": t_attr, "prune_s": time.perf_counter() - start,
                        "active_features": len(graph.active_features), "feature_nodes": len(graph.selected_features),
                        "nodes": int(graph.adjacency_matrix.shape[0]), "kept_nodes": int(node_mask.sum())}

            def run_ours() -> dict:
                ours.stdin.write("go\n")
                ours.stdin.flush()
                return json.loads(ours.stdout.readline())

            for r in range(args.rounds):
                row = {}
                for side in (("circuit_tracer", "ours") if r % 2 == 0 else ("ours", "circuit_tracer")):
                    load_before = os.getloadavg()[0]
                    got = run_ct() if side == "circuit_tracer" else run_ours()
                    got["load_before"], got["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
                    row[side] = got
                rounds.append(row)
                print(json.dumps({"round": r, **row}), flush=True)
        finally:
            ours.stdin.close()
            ours.wait(60)

    def med(side, key):
        return statistics.median(r[side][key] for r in rounds)

    import circuit_tracer as ct_package

    sys.path.insert(0, str(REPO))
    from benchmarks.machine import cpu_model

    summary = {side: {"attribute_s": round(med(side, "attribute_s"), 2), "prune_s": round(med(side, "prune_s"), 2)}
               for side in ("circuit_tracer", "ours")}
    summary["ratio_attribute"] = round(summary["circuit_tracer"]["attribute_s"] / summary["ours"]["attribute_s"], 2)
    summary["ratio_total"] = round((summary["circuit_tracer"]["attribute_s"] + summary["circuit_tracer"]["prune_s"])
                                   / (summary["ours"]["attribute_s"] + summary["ours"]["prune_s"]), 2)
    report = {"model": args.model, "layers": job["n_layers"], "tokens": args.tokens,
              "transcoders": str(args.transcoders) if args.transcoders else f"random topk width {args.random[0]} k {args.random[1]}",
              "caps": shared, "threads": args.threads, "dtype": "float32", "cpu": cpu_model(), "torch": torch.__version__,
              "circuit_tracer": getattr(ct_package, "__version__", "0.5.0"), "tl_vs_hf_logits_max_abs_diff": gap,
              "rounds": rounds, "median": summary, "command": " ".join(["python"] + sys.argv)}
    print(json.dumps({"median": summary}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
