"""A graph as the JSON that circuit-tracer's frontend and Neuronpedia's graph upload read
(circuit_tracer/utils/create_graph_files.py and frontend/graph_models.py, schema_version 1).

{"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version},
 "qParams": {pinnedIds, supernodes, linkType: "both", clickedId: "", sg_pos: ""},
 "nodes": [...], "links": [{source, target, weight}]}

Nodes are the pruned graph's (prune()), each with node_id, feature, layer (a string), ctx_idx,
feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence,
activation:
  feature  "{layer}_{feature}_{pos}"  feature = Cantor pair of (layer, feature),
           feature_type "cross layer transcoder", jsNodeId "{layer}_{feature}-0", activation
  error    "0_{layer}_{pos}"          feature -1, "mlp reconstruction error", jsNodeId "{layer}_{pos}-0"
  token    "E_{token id}_{pos}"       feature = pos, layer "E", "embedding", jsNodeId "E_{token id}-{pos}"
  logit    "{L+1}_{vocab id}_{T-1}"   feature = vocab id, layer "L+1", "logit", token_prob = p,
           is_target_logit for the most probable, jsNodeId "L_{vocab id}-{T-1}",
           clerp 'Output "{token}" (p={p:.3f})', no influence
influence is the node's cumulative influence share (Pruned.cumulative_scores), not its influence.
A link is an edge of the pruned edge mask, source -> target with the adjacency weight A[target,
source]; feature and error nodes left without links are dropped, token and logit nodes kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from trainer.circuits.graph import Graph
from trainer.circuits.prune import Pruned, prune

SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(graph: Graph, i: int, influence: float, decode: Callable[[list[int]], str]) -> dict:
    n = graph.node(i)
    base = {"node_id": "", "feature": 0, "layer": "", "ctx_idx": n.position, "feature_type": "",
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": "", "clerp": "", "influence": influence, "activation": None}
    if n.kind == "feature":
        return {**base, "node_id": f"{n.layer}_{n.index}_{n.position}", "feature": _cantor(n.layer, n.index),
                "layer": str(n.layer), "feature_type": "cross layer transcoder",
                "jsNodeId": f"{n.layer}_{n.index}-0",
                "activation": float(graph.activations[graph.selected_features[i]])}
    if n.kind == "error":
        return {**base, "node_id": f"0_{n.layer}_{n.position}", "feature": -1, "layer": str(n.layer),
                "feature_type": "mlp reconstruction error", "jsNodeId": f"{n.layer}_{n.position}-0"}
    if n.kind == "token":
        return {**base, "node_id": f"E_{n.index}_{n.position}", "feature": n.position, "layer": "E",
                "feature_type": "embedding", "jsNodeId": f"E_{n.index}-{n.position}"}
    j = i - graph.logit_slice.start
    p = float(graph.logit_probabilities[j])
    layer = str(graph.n_layers + 1)
    return {**base, "node_id": f"{layer}_{n.index}_{n.position}", "feature": n.index, "layer": layer,
            "feature_type": "logit", "token_prob": p, "is_target_logit": j == 0,
            "jsNodeId": f"L_{n.index}-{n.position}", "clerp": f'Output "{decode([n.index])}" (p={p:.3f})',
            "influence": None}


def graph_json(graph: Graph, slug: str, scan: str, decode: Callable[[list[int]], str],
               node_threshold: float = 0.8, edge_threshold: float = 0.98, pruned: Pruned | None = None) -> dict:
    """The frontend's graph file for `graph` (decode: token ids -> text, the tokenizer's decode)."""
    pruned = pruned or prune(graph, node_threshold, edge_threshold)
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = {i: _node(graph, i, float(pruned.cumulative_scores[i]), decode) for i in kept}
    links = []
    for target, source in pruned.edge_mask.nonzero().tolist():
        if source in nodes and target in nodes:
            links.append({"source": nodes[source]["node_id"], "target": nodes[target]["node_id"],
                          "weight": float(graph.adjacency[target, source])})
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [],
                "prompt_tokens": [decode([int(t)]) for t in graph.tokens], "prompt": graph.prompt,
                "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(data: dict, folder: Path) -> Path:
    """Write {slug}.json and add its metadata to graph-metadata.json (replacing a same slug), the
    layout circuit-tracer's local server serves."""
    folder.mkdir(parents=True, exist_ok=True)
    slug = data["metadata"]["slug"]
    path = folder / f"{slug}.json"
    path.write_text(json.dumps(data, indent=2))
    index = folder / "graph-metadata.json"
    graphs = json.loads(index.read_text())["graphs"] if index.is_file() else []
    graphs = [g for g in graphs if g.get("slug") != slug] + [data["metadata"]]
    index.write_text(json.dumps({"graphs": graphs}, indent=2))
    return path
