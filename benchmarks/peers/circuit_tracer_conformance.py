"""Conformance of trainer.circuits with circuit-tracer 0.5.0 itself, on the same tiny model,
transcoders and prompt: the adjacency matrix, the active and selected features, the logit targets,
the pruned node and edge sets and the replacement / completeness scores.

Run it with the PEERS' python, which has circuit-tracer installed (`pip install --no-deps
circuit-tracer==0.5.0`; its transformer-lens and transformers are the venv's own); it calls our
venv's python for our side, so neither venv imports the other's code:

    /work/main/.peers/venv/bin/python benchmarks/peers/circuit_tracer_conformance.py \
        --ours-python /work/main/.venv/bin/python

1. ours (--make): a tiny random Llama (tests.helpers.make_tiny_model: 4 blocks, width 64, GQA),
   its norm weights randomised so that they matter, saved as a transformers folder; the prompt's
   token ids (BOS first); random transcoders per case, saved as circuit-tracer's
   SingleLayerTranscoder tensors (W_enc, W_dec [F, D], b_enc, b_dec, W_skip, threshold).
2. circuit-tracer: the same weights in a TransformerLens HookedTransformer (transformer_lens's own
   convert_llama_weights), TransformerLensReplacementModel.from_config with a TranscoderSet on
   mlp.hook_in -> mlp.hook_out (what our mlp_in.L -> mlp_out.L are), then attribute(),
   prune_graph() and compute_graph_scores().
3. ours (--ours): trainer.lm.load_lm on the folder, the same transcoders as our SAE classes
   (circuit-tracer encodes W_enc x + b_enc, ours W_enc (x - b_dec) + b_enc', so b_enc' = b_enc +
   W_enc b_dec), trainer.circuits.attribute, prune, graph_scores.
Notes: huggingface_hub 2.x lacks HF_HUB_ENABLE_HF_TRANSFER, which circuit_tracer.utils.hf_utils
imports; this script sets it before importing circuit-tracer. circuit-tracer's TopK keeps
negative values among the top k where ours clamps them to zero, so the TopK case gives b_enc an
offset that keeps the top k positive. Writes benchmarks/results/circuit_tracer_conformance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def area(width, height):\n    return width *"
CASES = {
    # name: (activation, skip, d_transcoder, max_feature_nodes, batch_size, update_interval)
    "jumprelu": ("jumprelu", False, 128, None, 64, 4),
    "topk_skip": ("topk", True, 128, None, 64, 4),
    "relu": ("relu", False, 96, None, 64, 4),
    "jumprelu_capped": ("jumprelu", False, 128, 24, 8, 1),
}
K = 8


# --- our side ---------------------------------------------------------------------------------

def make(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tests.helpers import make_tiny_model
    from trainer.lm import load_lm

    model_dir = make_tiny_model(folder / "model", "llama", seed=5)
    lm = load_lm(str(model_dir), "cpu", "float32")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in lm.model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
    lm.model.save_pretrained(model_dir)
    ids = [lm.bos_token_id] + lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    d = lm.d_model
    for case, (act, skip, width, *_rest) in CASES.items():
        out = folder / case
        out.mkdir()
        for layer in range(lm.n_layers):
            t = {"W_enc": torch.randn(width, d, generator=g) / d ** 0.5,
                 "W_dec": torch.randn(width, d, generator=g) * 0.2,
                 "b_enc": torch.randn(width, generator=g) * 0.1 + (3.0 if act == "topk" else 0.0),
                 "b_dec": torch.randn(d, generator=g) * 0.05}
            if act == "jumprelu":
                t["threshold"] = 0.6 + 0.4 * torch.rand(width, generator=g)
            if skip:
                t["W_skip"] = torch.randn(d, d, generator=g) * 0.3 / d ** 0.5
            save_file(t, str(out / f"layer_{layer}.safetensors"))
    (folder / "job.json").write_text(json.dumps({"tokens": ids, "n_layers": lm.n_layers}))


def our_transcoder(t: dict, d_model: int, width: int, architecture: str, k: int, layer: int):
    """Our Transcoder for block `layer` from circuit-tracer SingleLayerTranscoder tensors: their b_enc
    acts on x - b_dec, ours on x; a W_skip [d_out, d_in] is in the same layout on both sides."""
    import torch

    from trainer.circuits.transcoders import Transcoder
    from trainer.formats.common import SiteIO
    from trainer.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(d_in=d_model, d_sae=width, architecture=architecture, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
        sae.b_enc.copy_(t["b_enc"] + t["W_enc"] @ t["b_dec"])
        if architecture == "jumprelu":
            sae.threshold.copy_(t["threshold"])
    if "W_skip" in t:
        sae.io = SiteIO(restore_output=False, w_skip=t["W_skip"])
    return Transcoder(sae, f"mlp_in.{layer}", f"mlp_out.{layer}")


def ours(folder: Path, case: str) -> None:
    import torch
    from safetensors.torch import load_file

    from trainer.circuits.attribute import AttributionConfig, attribute
    from trainer.circuits.export import graph_json
    from trainer.circuits.prune import graph_scores, prune
    from trainer.circuits.replacement import ReplacementModel
    from trainer.lm import load_lm

    torch.set_num_threads(1)
    act, skip, width, cap, batch, interval = CASES[case]
    job = json.loads((folder / "job.json").read_text())
    lm = load_lm(str(folder / "model"), "cpu", "float32")
    tcs = [our_transcoder(load_file(str(folder / case / f"layer_{layer}.safetensors")), lm.d_model, width, act, K, layer)
           for layer in range(lm.n_layers)]
    assert all(tc.has_skip == skip for tc in tcs)
    rm = ReplacementModel(lm, tcs)
    start = time.perf_counter()
    graph = attribute(job["tokens"], rm, AttributionConfig(batch_size=batch, max_feature_nodes=cap, update_interval=interval))
    seconds = time.perf_counter() - start
    pruned = prune(graph)
    scores = graph_scores(graph)
    data = graph_json(graph, case, "conformance", lm.tokenizer.decode, pruned=pruned)
    (folder / f"{case}.ours.json").write_text(json.dumps(data))
    np.savez(folder / f"{case}.ours.npz", adjacency=graph.adjacency.numpy(), active=graph.active_features.numpy(),
             activations=graph.activations.numpy(), selected=graph.selected_features.numpy(),
             logit_tokens=graph.logit_tokens.numpy(), probs=graph.logit_probabilities.numpy(),
             node_mask=pruned.node_mask.numpy(), edge_mask=pruned.edge_mask.numpy(),
             cumulative=pruned.cumulative_scores.numpy(), scores=np.array(scores), seconds=seconds)


# --- circuit-tracer's side ----------------------------------------------------------------------

def tl_config(hf_config, n_vocab: int, tokenizer_name: str):
    import torch
    from transformer_lens import HookedTransformerConfig

    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    return HookedTransformerConfig.from_dict({
        "n_layers": hf_config.num_hidden_layers, "d_model": hf_config.hidden_size, "n_ctx": 256,
        "d_head": d_head, "model_name": "tiny-llama", "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size, "act_fn": "silu", "d_vocab": n_vocab, "d_vocab_out": n_vocab,
        "eps": hf_config.rms_norm_eps, "normalization_type": "RMS", "final_rms": True,
        "positional_embedding_type": "rotary", "rotary_dim": d_head, "rotary_adjacent_pairs": False,
        "rotary_base": float(getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]),
        "gated_mlp": True, "n_key_value_heads": hf_config.num_key_value_heads,
        "original_architecture": "LlamaForCausalLM", "tokenizer_prepends_bos": True,
        "default_prepend_bos": False, "dtype": torch.float32, "device": "cpu",
        "use_attn_scale": True, "attn_only": False, "init_weights": False, "tokenizer_name": tokenizer_name,
    })


def run_circuit_tracer(folder: Path, case: str) -> dict:
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False  # gone from huggingface_hub 2.x
    import torch
    import torch.nn.functional as F
    import transformers
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from safetensors.torch import load_file
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    torch.set_num_threads(1)
    act, skip, width, cap, batch, interval = CASES[case]
    job = json.loads((folder / "job.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder / "model")
    cfg = tl_config(hf.config, hf.config.vocab_size, str(folder / "model"))
    tcs = {}
    for layer in range(cfg.n_layers):
        t = load_file(str(folder / case / f"layer_{layer}.safetensors"))
        if act == "jumprelu":
            fn = JumpReLU(t["threshold"].clone(), 0.1)
        else:
            fn = TopK(K) if act == "topk" else F.relu
        tc = SingleLayerTranscoder(cfg.d_model, width, fn, layer, skip_connection=skip, device=torch.device("cpu"),
                                   dtype=torch.float32)
        state = {k: v for k, v in t.items() if k != "threshold"}
        if act == "jumprelu":
            state["activation_function.threshold"] = t["threshold"]
        tc.load_state_dict(state)
        tcs[layer] = tc
    tset = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="conformance")
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tok)
    state = {}
    for key, value in convert_llama_weights(hf, cfg).items():
        key = key.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed.")
        state[key] = value.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if not k.startswith("transcoders.") and k.split(".")[-1] not in ("mask", "IGNORE", "rotary_sin", "rotary_cos")], missing
    tokens = torch.tensor(job["tokens"])
    with torch.no_grad():
        tl_logits = model(tokens[None])[0]
        hf_logits = hf(input_ids=tokens[None]).logits[0]
    start = time.perf_counter()
    graph = attribute(tokens, model, batch_size=batch, max_feature_nodes=cap, update_interval=interval)
    seconds = time.perf_counter() - start
    node_mask, edge_mask, cumulative = prune_graph(graph)
    scores = compute_graph_scores(graph)
    try:
        create_graph_files(graph, case, str(folder / "ct-json"), scan="conformance")
        ct_json = json.loads((folder / "ct-json" / f"{case}.json").read_text())
    except Exception as exc:  # noqa: BLE001  (reported, not fatal: the graphs still compare)
        ct_json = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"adjacency": graph.adjacency_matrix.numpy(), "active": graph.active_features.numpy(),
            "activations": graph.activation_values.numpy(), "selected": graph.selected_features.numpy(),
            "logit_tokens": np.array([t.vocab_idx for t in graph.logit_targets]),
            "probs": graph.logit_probabilities.numpy(), "node_mask": node_mask.numpy(), "edge_mask": edge_mask.numpy(),
            "cumulative": cumulative.numpy(), "scores": np.array(scores), "seconds": seconds,
            "tl_vs_hf_logits": float((tl_logits - hf_logits).abs().max()), "json": ct_json}


def compare_json(ct_json: dict, ours_json: dict) -> dict:
    """Our graph file against circuit-tracer's pydantic schema and its own file for the same graph."""
    from circuit_tracer.frontend.graph_models import Model

    out: dict = {}
    try:
        Model.model_validate(ours_json)
        out["ours_validates"] = True
    except Exception as exc:  # noqa: BLE001
        out["ours_validates"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if "error" in ct_json:
        out["circuit_tracer_file"] = ct_json["error"]
        return out
    ids = lambda d: [n["node_id"] for n in d["nodes"]]
    out["same_node_ids"] = ids(ct_json) == ids(ours_json)
    links = lambda d: {(k["source"], k["target"]): k["weight"] for k in d["links"]}
    a, b = links(ct_json), links(ours_json)
    out["same_links"] = set(a) == set(b)
    if set(a) == set(b) and a:
        out["link_weight_max_abs_diff"] = max(abs(a[k] - b[k]) for k in a)
    keys = ("feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "is_target_logit")
    out["same_node_fields"] = [{k: n[k] for k in keys} for n in ct_json["nodes"]] == \
        [{k: n[k] for k in keys} for n in ours_json["nodes"]]
    out["same_metadata"] = ct_json["metadata"] == ours_json["metadata"]
    return out


def compare(ct: dict, us: dict) -> dict:
    a, b = ct["adjacency"], us["adjacency"]
    same_shape = a.shape == b.shape
    out = {"nodes": int(a.shape[0]), "features_active": len(ct["active"]), "features_selected": len(ct["selected"]),
           "same_active_features": bool(np.array_equal(ct["active"], us["active"])),
           "activations_max_abs_diff": float(np.abs(ct["activations"] - us["activations"]).max()) if len(ct["active"]) == len(us["active"]) else None,
           "same_selected_features": bool(np.array_equal(ct["selected"], us["selected"])),
           "same_logit_targets": bool(np.array_equal(ct["logit_tokens"], us["logit_tokens"])),
           "probabilities_max_abs_diff": float(np.abs(ct["probs"] - us["probs"]).max()),
           "same_shape": same_shape, "tl_vs_hf_logits_max_abs_diff": ct["tl_vs_hf_logits"],
           "seconds_circuit_tracer": float(ct["seconds"]), "seconds_ours": float(us["seconds"])}
    if same_shape:
        out["adjacency_max_abs"] = float(np.abs(a).max())
        out["adjacency_max_abs_diff"] = float(np.abs(a - b).max())
        out["adjacency_max_rel_diff"] = float((np.abs(a - b) / (np.abs(a) + 1e-6 * np.abs(a).max())).max())
        out["same_pruned_nodes"] = bool(np.array_equal(ct["node_mask"], us["node_mask"]))
        out["pruned_nodes_kept"] = int(ct["node_mask"].sum())
        out["edge_mask_differences"] = int((ct["edge_mask"] != us["edge_mask"]).sum())
        out["edges_kept"] = int(ct["edge_mask"].sum())
        out["cumulative_max_abs_diff"] = float(np.abs(ct["cumulative"] - us["cumulative"]).max())
    out["scores_circuit_tracer"] = [float(x) for x in ct["scores"]]
    out["scores_ours"] = [float(x) for x in us["scores"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ours", nargs=2, metavar=("FOLDER", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "circuit_tracer_conformance.json")
    args = ap.parse_args()
    if args.make:
        return make(args.make)
    if args.ours:
        return ours(Path(args.ours[0]), args.ours[1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="ct-conformance-") as tmp:
        folder = Path(tmp)
        env.setdefault("SAE_ATLAS_DATA_DIR", str(folder / "data"))
        subprocess.run([args.ours_python, __file__, "--make", str(folder)], check=True, env=env, cwd=REPO)
        for case in CASES:
            ct = run_circuit_tracer(folder, case)
            subprocess.run([args.ours_python, __file__, "--ours", str(folder), case], check=True, env=env, cwd=REPO)
            us = dict(np.load(folder / f"{case}.ours.npz"))
            results[case] = compare(ct, us)
            results[case]["json"] = compare_json(ct["json"], json.loads((folder / f"{case}.ours.json").read_text()))
            print(case, json.dumps(results[case]), flush=True)
    import circuit_tracer as ct_package
    import torch
    report = {"circuit_tracer": getattr(ct_package, "__version__", "?"), "torch": torch.__version__,
              "python": sys.version.split()[0], "prompt": PROMPT, "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
