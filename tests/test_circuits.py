"""Attribution graphs (trainer.circuits) against expectations computed here, never by the code
under test.

- The replacement model with its error nodes gives the real model's logits, and its nodes add up
  to each real MLP output.
- Exactness, as circuit-tracer's own tests check it (tests/test_attributions_gemma.py,
  verify_feature_edges / verify_token_and_error_edges): in the frozen replacement model, written
  out below with forward hooks of its own, scaling one source by (1 + delta) moves every feature
  pre-activation and every demeaned logit target by delta * A[target, source] (features:
  atol 5e-4 / rtol 1e-5 on pre-activations; errors and tokens: 1e-3 / 1e-3; logits 1e-5 / 1e-3).
- Influence, pruning and scores on a hand-made adjacency matrix, worked by hand from
  circuit-tracer's definitions (circuit_tracer/graph.py).
- Logit targets by circuit-tracer's rule, worked by hand.
- One-line errors for bad input.
"""

from __future__ import annotations

import pytest
import torch

from store.errors import AtlasError
from trainer.circuits.attribute import AttributionConfig, attribute
from trainer.circuits.graph import Graph
from trainer.circuits.prune import graph_scores, node_influence, partial_influence, prune
from trainer.circuits.replacement import ReplacementModel
from trainer.circuits.targets import salient_logits
from trainer.circuits.transcoders import Transcoder
from trainer.formats.common import SiteIO
from trainer.sae import SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "def add(a, b):\n    return a +"

# Where each family keeps what the hand-written frozen model touches: the modules whose outputs
# are the queries and keys (or the fused q|k|v projection and its layout), and the module whose
# output is mlp_out (Gemma 2 normalises the MLP's output before adding it).
FAMILY_PARTS = {
    "llama": {"qk": ("self_attn.q_proj", "self_attn.k_proj"), "mlp_out": "mlp"},
    "gemma2": {"qk": ("self_attn.q_proj", "self_attn.k_proj"), "mlp_out": "post_feedforward_layernorm"},
    "gpt2": {"qkv": "attn.c_attn", "per_head": False, "mlp_out": "mlp"},
    "gpt_neox": {"qkv": "attention.query_key_value", "per_head": True, "mlp_out": "mlp"},
}


# --- fixtures: tiny random models and random transcoders ------------------------------------------

@pytest.fixture(scope="module", params=list(FAMILY_PARTS))
def family_lm(request, tiny_model_dir, tmp_path_factory):
    from tests.helpers import load_family_lm

    lm = load_family_lm(tmp_path_factory.mktemp(request.param), tiny_model_dir, request.param)
    return request.param, lm


def random_transcoders(lm, architecture: str = "topk", skip: bool = False, seed: int = 0, d_sae: int = 96) -> list[Transcoder]:
    """Random transcoders whose predictions are about as large as the real MLP outputs on PROMPT
    (the tiny models' differ by 300x between families): a replacement model whose parts are far
    larger than what they replace cancels them against its error nodes and loses float precision."""
    from trainer.lm import Site

    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    ids = torch.tensor([[lm.bos_token_id] + lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    outs = lm.read(ids, [Site("mlp_out", layer) for layer in range(lm.n_layers)])
    out = []
    for layer in range(lm.n_layers):
        scale = float(outs[f"mlp_out.{layer}"][0, 1:].pow(2).mean().sqrt())
        sae = build_sae(SAEConfig(d_in=d, d_sae=d_sae, architecture=architecture, k=6))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_sae, d, generator=g) / d ** 0.5)
            sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) * scale / 4)
            sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(d, generator=g) * scale / 4)
            if architecture == "jumprelu":
                sae.threshold.fill_(0.8)
        if skip:
            sae.io = SiteIO(restore_output=False, w_skip=torch.randn(d, d, generator=g) * scale / d ** 0.5)
        out.append(Transcoder(sae, f"mlp_in.{layer}", f"mlp_out.{layer}"))
    return out


def save_transcoder_set(root, tiny_model_dir, tiny_lm, seed: int = 11, drop: int | None = None):
    """A random transcoder set saved as a run folder with its manifest (block `drop` left out)."""
    from trainer.formats.saelens import save_sae
    from trainer.transcoders.sets import SetLayer, write_transcoder_set

    layers = []
    for layer, tc in enumerate(random_transcoders(tiny_lm, seed=seed)):
        if layer == drop:
            continue
        folder = f"mlp.{layer}-topk-w96-k6"
        save_sae(root / folder, tc.sae, 1.0, tc.site, str(tiny_model_dir), output_site=tc.output_site)
        layers.append(SetLayer(layer, folder, tc.site, tc.output_site, "topk"))
    write_transcoder_set(root, "topk-w96-k6", True, str(tiny_model_dir), tiny_lm.n_layers, "topk", 96, 6, False, layers)
    return root


def hand_codes(tc: Transcoder, x: torch.Tensor) -> torch.Tensor:
    """Dense activations [T, F] by each architecture's inference rule, from the weights."""
    sae = tc.sae
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if sae.cfg.architecture == "topk":
        vals, idx = z.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(z).scatter(1, idx, vals.clamp_min(0))
    if sae.cfg.architecture == "jumprelu":
        return z * (z > sae.threshold)
    return z.clamp_min(0)


def hand_skip(tc: Transcoder, x: torch.Tensor) -> torch.Tensor:
    w = getattr(tc.sae.io, "W_skip", None)
    return torch.zeros_like(x) if w is None else x @ w.T


def _part(module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


class HandFrozen:
    """The frozen replacement model of one prompt, written out with plain forward hooks: queries
    and keys, each norm's scale and each MLP output held at the clean run's values (an RMSNorm maps
    x to out_clean + (x - x_clean) * s_clean * w, a LayerNorm does so after centring), a skip term
    recomputed from the new MLP input, and optional additions to MLP outputs and embeddings.
    run() returns what targets read: every layer's MLP input and the LM head's input."""

    def __init__(self, family: str, lm, tokens: torch.Tensor, transcoders):
        self.family, self.lm, self.tokens, self.tcs = family, lm, tokens, transcoders
        self.parts = FAMILY_PARTS[family]
        self.layers = list(lm.blocks)
        self.norms = [m for m in lm.model.modules()
                      if type(m).__name__.endswith("RMSNorm") or isinstance(m, torch.nn.LayerNorm)]
        self.clean: dict = {}
        self.mlp_in, self.lm_head_in = {}, None
        self._run(record=True)
        self.x_clean = torch.stack([self.mlp_in[i] for i in range(len(self.layers))])

    def _qk_mask(self, width: int) -> torch.Tensor:
        """1 on the value part of a fused q|k|v output of `width`."""
        if not self.parts["per_head"]:
            d = width // 3
            return torch.cat([torch.zeros(2 * d), torch.ones(d)])
        heads = self.lm.config.num_attention_heads
        size = width // (3 * heads)
        return torch.cat([torch.zeros(2 * size), torch.ones(size)]).repeat(heads)

    def _run(self, record: bool, out_delta=None, embed_delta=None):
        handles = []
        clean = self.clean

        def keep(key, value_mask=None):
            def hook(_m, _i, out):
                if record:
                    clean[key] = out.detach().clone()
                    return None
                if value_mask is None:
                    return clean[key]
                return clean[key] * (1 - value_mask) + out * value_mask
            return hook

        def norm(key, module):
            offset = 1.0 if self.family == "gemma2" else 0.0
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            centred = isinstance(module, torch.nn.LayerNorm)

            def hook(_m, args, out):
                x = args[0]
                if centred:
                    x = x - x.mean(-1, keepdim=True)
                if record:
                    clean[key] = (x.detach().clone(), out.detach().clone(),
                                  torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
                    return None
                x0, out0, s = clean[key]
                return out0 + (x - x0) * s * (module.weight + offset)
            return hook

        for i, layer in enumerate(self.layers):
            if "qk" in self.parts:
                for name in self.parts["qk"]:
                    handles.append(_part(layer, name).register_forward_hook(keep((name, i))))
            else:
                qkv = _part(layer, self.parts["qkv"])
                mask = self._qk_mask(qkv.weight.shape[1] if self.family == "gpt2" else qkv.out_features)
                handles.append(qkv.register_forward_hook(keep(("qkv", i), mask)))
        for j, m in enumerate(self.norms):
            handles.append(m.register_forward_hook(norm(("norm", j), m)))
        for i, layer in enumerate(self.layers):
            handles.append(layer.mlp.register_forward_pre_hook(
                lambda _m, args, i=i: self.mlp_in.__setitem__(i, args[0][0].detach().clone())))

            def mlp_out(_m, _a, out, i=i):
                if record:
                    clean[("y", i)] = out.detach().clone()
                    return None
                tc = self.tcs[i]
                new = clean[("y", i)] + (hand_skip(tc, self.mlp_in[i]) - hand_skip(tc, self.x_clean[i]))[None]
                for (layer_, pos), vec in (out_delta or {}).items():
                    if layer_ == i:
                        new[0, pos] += vec
                return new
            handles.append(_part(layer, self.parts["mlp_out"]).register_forward_hook(mlp_out))

        def embed(_m, _i, out):
            if record:
                clean["embed"] = out.detach().clone()
                return None
            new = out.clone()
            for pos, vec in (embed_delta or {}).items():
                new[0, pos] += vec
            return new
        handles.append(self.lm.model.get_input_embeddings().register_forward_hook(embed))

        def head(_m, args):
            self.lm_head_in = args[0][0].detach().clone()
        handles.append(self.lm.model.get_output_embeddings().register_forward_pre_hook(head))
        try:
            with torch.no_grad():
                self.lm.model(input_ids=self.tokens[None], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return torch.stack([self.mlp_in[i] for i in range(len(self.layers))]), self.lm_head_in

    def run(self, out_delta=None, embed_delta=None):
        return self._run(False, out_delta, embed_delta)


@torch.no_grad()
def targets_read(graph: Graph, tcs, lm, mlp_in: torch.Tensor, head_in: torch.Tensor):
    """Every active feature's pre-activation and every logit target's demeaned logit."""
    feats = graph.active_features[graph.selected_features]
    pre = torch.zeros(len(feats))
    for layer, tc in enumerate(tcs):
        at = feats[:, 0] == layer
        pos, f = feats[at, 1], feats[at, 2]
        pre[at] = ((mlp_in[layer, pos] - tc.sae.b_dec) * tc.sae.W_enc[f]).sum(-1) + tc.sae.b_enc[f]
    w = lm.unembed_weight
    logits = head_in[-1] @ (w[graph.logit_tokens] - w.mean(0)).T
    return pre, logits


# --- the replacement model ----------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_replacement_model_gives_the_real_logits_and_its_nodes_add_up(family_lm, skip):
    family, lm = family_lm
    tcs = random_transcoders(lm, skip=skip, seed=1)
    rm = ReplacementModel(lm, tcs)
    tokens = rm.tokenize(PROMPT)
    with torch.no_grad():
        real = lm.model(input_ids=tokens[None], use_cache=False).logits[0]
    prep = rm.prepare(tokens)
    lin = rm.linear_forward(prep)
    assert (lin.logits[0].detach() - real).abs().max() < 1e-4
    assert (prep.errors[:, 1:].norm(dim=-1) > 0.1 * prep.mlp_out[:, 1:].norm(dim=-1)).all()  # errors matter

    hand = HandFrozen(family, lm, tokens, tcs)
    for layer, tc in enumerate(tcs):
        x, y = hand.x_clean[layer], hand.clean[("y", layer)][0]
        codes = hand_codes(tc, x)
        c = prep.layers[layer]
        # the active features (BOS excluded) and their activations, as the weights give them
        want = codes[1:].nonzero()
        got = torch.stack([c.positions - 1, c.features], 1)
        assert torch.equal(got, want)
        torch.testing.assert_close(c.activations, codes[1:][codes[1:] > 0], rtol=1e-5, atol=1e-6)
        # each real MLP output = its features' decoder vectors + b_dec + skip + the error node
        total = torch.zeros_like(y).index_add_(0, c.positions, c.decoder) + tc.sae.b_dec + hand_skip(tc, x) + prep.errors[layer]
        torch.testing.assert_close(total[1:], y[1:], rtol=1e-5, atol=1e-5)
        assert prep.errors[layer, 0].abs().max() == 0


# --- exactness: perturbations of the frozen model -----------------------------------------------

@pytest.mark.parametrize("architecture, skip", [("topk", False), ("jumprelu", True), ("relu", False), ("topk", True)])
def test_edges_are_the_frozen_models_linear_effects(family_lm, architecture, skip):
    family, lm = family_lm
    tcs = random_transcoders(lm, architecture, skip, seed=2)
    rm = ReplacementModel(lm, tcs)
    graph = attribute(PROMPT, rm, AttributionConfig(backward_batch=32))
    a = graph.adjacency
    n_feat, n_log, T, L = graph.n_features, graph.n_logits, graph.n_pos, graph.n_layers
    hand = HandFrozen(family, lm, graph.tokens, tcs)
    pre0, logit0 = targets_read(graph, tcs, lm, *hand.run())
    delta = 1.0  # doubling the source, as circuit-tracer's test does

    def check(col, out_delta=None, embed_delta=None, act_tol=(5e-4, 1e-5)):
        pre, logit = targets_read(graph, tcs, lm, *hand.run(out_delta, embed_delta))
        torch.testing.assert_close(pre - pre0, delta * a[:n_feat, col], atol=act_tol[0], rtol=act_tol[1])
        torch.testing.assert_close(logit - logit0, delta * a[-n_log:, col], atol=1e-5, rtol=1e-3)
        return float((pre - pre0).abs().max())

    moved = []
    codes = [hand_codes(tc, hand.x_clean[layer]) for layer, tc in enumerate(tcs)]
    g = torch.Generator().manual_seed(0)
    for i in torch.randperm(n_feat, generator=g)[:12].tolist():
        layer, pos, f = graph.active_features[i].tolist()
        vec = codes[layer][pos, f] * tcs[layer].sae.W_dec[f]
        moved.append(check(i, out_delta={(layer, pos): delta * vec}))
    for layer in range(L):
        x = hand.x_clean[layer]
        err = hand.clean[("y", layer)][0] - (codes[layer] @ tcs[layer].sae.W_dec + tcs[layer].sae.b_dec + hand_skip(tcs[layer], x))
        for pos in range(1, T):
            col = n_feat + layer * T + pos
            moved.append(check(col, out_delta={(layer, pos): delta * err[pos]}, act_tol=(1e-3, 1e-3)))
    for pos in range(1, T):
        col = n_feat + L * T + pos
        moved.append(check(col, embed_delta={pos: delta * hand.clean["embed"][0, pos]}, act_tol=(1e-3, 1e-3)))
    assert max(moved) > 5e-3  # the perturbations did move the targets, 10x the tolerance: the checks can fail
    # BOS sources have no edges; nothing feeds error or token nodes
    assert a[:, n_feat:n_feat + L * T:T].abs().max() == 0
    assert a[n_feat:n_feat + (L + 1) * T].abs().max() == 0


def test_capped_graph_is_the_full_graph_restricted(tiny_lm):
    tcs = random_transcoders(tiny_lm, seed=3)
    rm = ReplacementModel(tiny_lm, tcs)
    full = attribute(PROMPT, rm, AttributionConfig(backward_batch=16))
    cap = 10
    capped = attribute(PROMPT, rm, AttributionConfig(batch_size=4, update_interval=1, max_feature_nodes=cap,
                                                      backward_batch=3))
    assert capped.n_features == cap and full.n_features > cap
    keep = torch.cat([capped.selected_features, torch.arange(full.n_features, full.n_nodes)])
    torch.testing.assert_close(capped.adjacency, full.adjacency[keep][:, keep], atol=1e-6, rtol=1e-5)
    # The first four picked are the four most influential features through the logit rows alone.
    logit_rows = full.adjacency[-full.n_logits:]
    direct = (full.logit_probabilities[:, None] * logit_rows.abs() / logit_rows.abs().sum(1, keepdim=True)).sum(0)
    first = set(direct[:full.n_features].topk(4).indices.tolist())
    assert first <= set(capped.selected_features.tolist())


# --- influence, pruning and scores on a hand-made graph -------------------------------------------

def hand_graph() -> Graph:
    """Two layers, one position: nodes f0 (layer 0), f1 (layer 1), e0, e1, t0, logit (p = 1).

    A[f0] = {t0: 1}              -> Â[f0] = {t0: 1}
    A[f1] = {f0: 1, t0: -3}      -> Â[f1] = {f0: .25, t0: .75}
    A[L]  = {f1: 4, f0: -1, e1: 3, t0: 2}  -> Â[L] = {f1: .4, f0: .1, e1: .3, t0: .2}
    """
    a = torch.zeros(6, 6)
    a[0, 4] = 1
    a[1, 0], a[1, 4] = 1, -3
    a[5, 1], a[5, 0], a[5, 3], a[5, 4] = 4, -1, 3, 2
    return Graph("x", torch.tensor([7]), 2, torch.tensor([[0, 0, 3], [1, 0, 5]]), torch.tensor([1.0, 2.0]),
                 torch.tensor([0, 1]), torch.tensor([9]), torch.tensor([1.0]), a)


def test_influence_pruning_and_scores_by_hand():
    g = hand_graph()
    # I = wÂ + wÂ² + wÂ³: wÂ = {f1 .4, f0 .1, e1 .3, t0 .2}; wÂ² = .4 Â[f1] + .1 Â[f0] = {f0 .1, t0 .3 + .1};
    # wÂ³ = .1 Â[f0] = {t0 .1}.  I = f0 .2, f1 .4, e0 0, e1 .3, t0 .7, L 0 (total 1.6)
    torch.testing.assert_close(node_influence(g), torch.tensor([.2, .4, 0, .3, .7, 0]))

    # Nodes at 0.8: shares in order t0 .4375, f1 .6875, e1 .875 -> the cut is e1's .3: f0 and e0 go.
    p = prune(g)
    assert p.node_mask.tolist() == [False, True, False, True, True, True]
    torch.testing.assert_close(p.cumulative_scores, torch.tensor([1.0, .6875, 1.0, .875, .4375, 1.0]))

    # Nodes at 0.95 keep f0 (the cut is f0's .2). The edges, with the same Â and I (e0 had none),
    # score Â[t,s](I_t + w_t): L<-f1 .4, L<-e1 .3, L<-t0 .2, L<-f0 .1, f1<-t0 .3, f1<-f0 .1, f0<-t0 .2;
    # shares .25, .4375, .625, .75, .875, ... -> at 0.85 the cut is .2: L<-f0 and f1<-f0 go, so f0
    # has no way out and goes too, and with it f0<-t0.
    p = prune(g, node_threshold=0.95, edge_threshold=0.85)
    assert p.node_mask.tolist() == [False, True, False, True, True, True]
    kept = {(int(t), int(s)) for t, s in p.edge_mask.nonzero()}
    assert kept == {(5, 1), (5, 3), (5, 4), (1, 4)}

    # Replacement: I(t0) / (I(t0) + I(errors)) = .7 / (.7 + .3). Completeness: every row but L's
    # has no error share; L's is .3: (.2 + .4 + 0 + .3 + .7 + (1 - .3)(0 + 1)) / (1.6 + 1) = 2.3 / 2.6.
    replacement, completeness = graph_scores(g)
    assert replacement == pytest.approx(0.7, abs=1e-6)
    assert completeness == pytest.approx(2.3 / 2.6, abs=1e-6)
    # Pruned (f0 dropped, counted as error): .7 / (.7 + .3 + .2); completeness: L's error share
    # .3 + .1, f1's .25: (.2 + .4 * .75 + .3 + .7 + .6) / 2.6.
    replacement, completeness = graph_scores(g, p.node_mask)
    assert replacement == pytest.approx(0.7 / 1.2, abs=1e-6)
    assert completeness == pytest.approx(2.1 / 2.6, abs=1e-6)


def test_threshold_scores_by_hand():
    from trainer.circuits.prune import threshold_score

    scores = torch.tensor([[0.0, 3.0, 1.0], [0.0, 2.0, 0.0]])
    # sorted 3, 2, 1 (zeros last): shares .5, .83, 1
    assert threshold_score(scores, 0.5) == 3.0
    assert threshold_score(scores, 0.6) == 2.0
    assert threshold_score(scores, 0.9) == 1.0
    assert threshold_score(torch.zeros(4), 0.8) == 0.0


def test_partial_influence_by_hand():
    g = hand_graph()
    logit_row = g.adjacency[5:6]
    # From the logit row alone: wÂ[L] and nothing further.
    got = partial_influence(logit_row, torch.tensor([5]), torch.tensor([1.0]))
    torch.testing.assert_close(got, torch.tensor([.1, .4, 0, .3, .2, 0]))
    # With every feature row too it is the full influence.
    got = partial_influence(g.adjacency[[5, 0, 1]], torch.tensor([5, 0, 1]), torch.tensor([1.0]))
    torch.testing.assert_close(got, torch.tensor([.2, .4, 0, .3, .7, 0]))


def test_logit_targets_by_hand():
    probs = torch.tensor([0.05, 0.5, 0.01, 0.3, 0.12, 0.02])
    logits = probs.log() + 3.0
    unembed = torch.arange(12.0).reshape(6, 2) ** 2
    t = salient_logits(logits, unembed)
    # .5, .8, .92, .97: the fourth reaches .95 and is kept
    assert t.tokens.tolist() == [1, 3, 4, 0]
    torch.testing.assert_close(t.probabilities, torch.tensor([0.5, 0.3, 0.12, 0.05]))
    mean = unembed.mean(0)
    torch.testing.assert_close(t.vectors, unembed[[1, 3, 4, 0]] - mean)
    assert salient_logits(logits, unembed, max_n=2).tokens.tolist() == [1, 3]
    assert salient_logits(logits, unembed, desired_prob=0.45).tokens.tolist() == [1]


# --- bad input ------------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_input_is_one_line(tiny_lm):
    from pathlib import Path

    from trainer.formats.common import LoadedSAE

    tcs = random_transcoders(tiny_lm, seed=4)
    rm = ReplacementModel(tiny_lm, tcs)
    with pytest.raises(AtlasError) as exc:
        attribute(list(range(5, 70)), rm)
    assert "65 tokens" in one_line(exc) and "64" in one_line(exc)
    with pytest.raises(AtlasError) as exc:
        attribute("", rm)
    assert "empty" in one_line(exc)
    # a prompt that starts with a special token keeps it as its BOS; otherwise the BOS is added
    assert rm.tokenize([tiny_lm.bos_token_id, 5, 6]).tolist() == [tiny_lm.bos_token_id, 5, 6]
    assert rm.tokenize([5, 6]).tolist() == [tiny_lm.bos_token_id, 5, 6]
    with pytest.raises(AtlasError) as exc:
        ReplacementModel(tiny_lm, {i: t for i, t in enumerate(tcs) if i != 2})
    assert "lacks layers [2]" in one_line(exc)
    plain = LoadedSAE(tcs[1].sae, Path("sae"), "saelens", "topk", site="resid_post.1", transcoder=False)
    with pytest.raises(AtlasError) as exc:
        ReplacementModel(tiny_lm, [tcs[0], plain] + tcs[2:])
    assert "not a transcoder" in one_line(exc)
    with pytest.raises(AtlasError) as exc:
        ReplacementModel(tiny_lm, [Transcoder(tcs[0].sae, "mlp_in.0", "mlp_out.1")] + tcs[1:])
    assert "mlp_in.0 -> mlp_out.1" in one_line(exc)


# --- the frontend's graph file ----------------------------------------------------------------------

def test_graph_json_follows_circuit_tracers_schema(tmp_path):
    from trainer.circuits.export import graph_json, write_graph_files

    g = hand_graph()
    data = graph_json(g, "hand", "scan-x", lambda ids: f"<{ids[0]}>")
    # Pruned at the defaults: f1, e1, t0 and the logit stay, with the four edges into them
    # (see test_influence_pruning_and_scores_by_hand); cumulative influence shares .6875, .875, .4375.
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "activation": None}
    influence = [n.pop("influence") for n in data["nodes"]]
    assert influence[:3] == pytest.approx([0.6875, 0.875, 0.4375]) and influence[3] is None
    assert data["nodes"] == [
        {**base, "node_id": "1_5_0", "feature": 26, "layer": "1", "ctx_idx": 0, "feature_type": "cross layer transcoder",
         "jsNodeId": "1_5-0", "activation": 2.0},
        {**base, "node_id": "0_1_0", "feature": -1, "layer": "1", "ctx_idx": 0, "feature_type": "mlp reconstruction error",
         "jsNodeId": "1_0-0"},
        {**base, "node_id": "E_7_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
         "jsNodeId": "E_7-0"},
        {**base, "node_id": "3_9_0", "feature": 9, "layer": "3", "ctx_idx": 0, "feature_type": "logit", "token_prob": 1.0,
         "is_target_logit": True, "jsNodeId": "L_9-0", "clerp": 'Output "<9>" (p=1.000)'},
    ]
    assert data["links"] == [
        {"source": "E_7_0", "target": "1_5_0", "weight": -3.0},
        {"source": "1_5_0", "target": "3_9_0", "weight": 4.0},
        {"source": "0_1_0", "target": "3_9_0", "weight": 3.0},
        {"source": "E_7_0", "target": "3_9_0", "weight": 2.0},
    ]
    assert data["metadata"] == {"slug": "hand", "scan": "scan-x", "transcoder_list": [], "prompt_tokens": ["<7>"],
                                "prompt": "x", "node_threshold": 0.8, "schema_version": 1}
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    write_graph_files(data, tmp_path)
    write_graph_files(data, tmp_path)  # the same slug again replaces its entry
    import json

    assert json.loads((tmp_path / "hand.json").read_text()) == data
    assert json.loads((tmp_path / "graph-metadata.json").read_text()) == {"graphs": [data["metadata"]]}
