"""The local replacement model of one prompt (circuit-tracer's ReplacementModel, on our LoadedLM).

`prepare` runs the real model once and applies every layer's transcoder to its mlp_in
activations: the active features, their encoder and decoder vectors, the reconstructions, and one
error node per (layer, position), e = mlp_out - reconstruction. Features at position 0 (the BOS
we prepend) are dropped and the error nodes there are zero, as in circuit-tracer; what the MLP
writes there stays in the model as a constant, like the biases.

`linear_forward` then runs the frozen replacement model with autograd on: attention patterns and
normalisation scales frozen (LoadedLM.freeze_for_attribution), each MLP's output replaced by its
transcoder's prediction plus the error node, where only b_dec + W_skip x still depends on the
input and the rest (features and error) is a constant. That model is linear in the residual
stream and, with the error nodes, gives the real logits. Its graph is what attribution
differentiates: a target's gradient, contracted with a source's vector at the source's site, is
the edge A[target, source].
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from store.errors import AtlasError
from trainer.circuits.transcoders import LayerCodes, TranscoderSet
from trainer.lm import LoadedLM, Site

ZERO_POSITIONS = 1
"""Leading positions whose features and error nodes are zeroed (the BOS; circuit-tracer's
zero_positions for every model but instruction-tuned Gemma 3)."""


@dataclass
class Prepared:
    """What the real forward pass and the transcoders give for one prompt."""

    tokens: torch.Tensor
    """[T] long, BOS first."""
    logits: torch.Tensor
    """[T, V] float32: the real model's logits."""
    layers: list[LayerCodes]
    """Per layer: active features, encoder and decoder vectors, reconstruction."""
    mlp_in: torch.Tensor
    """[L, T, D] float32: the transcoders' inputs."""
    mlp_out: torch.Tensor
    """[L, T, D] float32: the real MLP outputs (the transcoders' targets)."""
    errors: torch.Tensor
    """[L, T, D] float32: error nodes, mlp_out - reconstruction, zero at the BOS."""
    embeddings: torch.Tensor
    """[T, D] float32: token embeddings, the token nodes' vectors."""

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    def feature_table(self) -> torch.Tensor:
        """[N, 3] long (layer, position, feature) of every active feature, in node order."""
        parts = [torch.stack([torch.full_like(c.positions, layer), c.positions, c.features], 1)
                 for layer, c in enumerate(self.layers)]
        return torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.long)


@dataclass
class LinearGraph:
    """Tensors of the frozen replacement model's forward pass (batch 1), kept with their graph."""

    embeddings: torch.Tensor
    """[1, T, D] leaf: the token embeddings (sources of token nodes)."""
    mlp_in: list[torch.Tensor] = field(default_factory=list)
    """Per layer [1, T, D]: the MLP inputs (where feature targets read their pre-activation)."""
    mlp_out: list[torch.Tensor] = field(default_factory=list)
    """Per layer [1, T, D]: the MLP outputs as replaced (where features and errors write)."""
    final: torch.Tensor | None = None
    """[1, T, D]: the final norm's output (where logit targets read)."""
    logits: torch.Tensor | None = None
    """[1, T, V]: the frozen model's logits (equal to the real ones)."""


def prompt_tokens(lm: LoadedLM, prompt: str | list[int] | torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [T] with the model's BOS first (added unless the prompt starts with a special
    token, as circuit-tracer's ensure_tokenized does). max_tokens counts the prompt's tokens."""
    tok = lm.tokenizer
    if isinstance(prompt, str):
        ids = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    special = set(getattr(tok, "all_special_ids", []) or []) | {lm.bos_token_id}
    if len(ids) and int(ids[0]) in special:
        n_prompt = len(ids) - 1
    else:
        n_prompt = len(ids)
        ids = torch.cat([torch.tensor([lm.bos_token_id]), ids])
    if n_prompt == 0:
        raise AtlasError("the prompt is empty", "give at least one token to attribute")
    if max_tokens is not None and n_prompt > max_tokens:
        raise AtlasError(f"the prompt has {n_prompt} tokens, more than the {max_tokens} an attribution graph allows",
                         "shorten the prompt")
    if int(ids.max()) >= lm.vocab_size or int(ids.min()) < 0:
        raise AtlasError(f"token ids must lie in 0..{lm.vocab_size - 1}", "tokenize with the model's tokenizer")
    return ids


class ReplacementModel:
    """An LM with one transcoder per block (see the module docstring). Load the LM in float32
    (load_lm(..., dtype="float32")) for graphs exact to float32 round-off, as circuit-tracer's
    defaults do; in bfloat16 (the "auto" dtype on AMX CPUs) it runs, with bf16's three digits."""

    def __init__(self, lm: LoadedLM, transcoders):
        self.lm = lm
        self.transcoders = transcoders if isinstance(transcoders, TranscoderSet) else \
            TranscoderSet(transcoders, lm.n_layers, lm.d_model)
        if len(self.transcoders) != lm.n_layers:
            raise AtlasError(f"the transcoder set has {len(self.transcoders)} layers, {lm.name} has {lm.n_layers}",
                             "use the transcoder set made for this model")

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    def tokenize(self, prompt: str | list[int] | torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
        """Token ids [T] with the model's BOS first (prompt_tokens)."""
        return prompt_tokens(self.lm, prompt, max_tokens)

    def _sites(self, kind: str) -> list[Site]:
        return [Site(kind, layer) for layer in range(self.n_layers)]

    @torch.no_grad()
    def prepare(self, tokens: torch.Tensor) -> Prepared:
        """Run the real model on tokens [T] and every transcoder on its input."""
        lm = self.lm
        seen: dict[str, torch.Tensor] = {}
        handles = [lm.capture(site, seen) for site in self._sites("mlp_in") + self._sites("mlp_out")]
        handles.append(lm.hook_embedding(lambda e: seen.__setitem__("embed", e)))
        try:
            logits = lm.model(input_ids=tokens[None].to(lm.device), use_cache=False).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        mlp_in = torch.stack([seen[f"mlp_in.{layer}"][0].float() for layer in range(self.n_layers)])
        mlp_out = torch.stack([seen[f"mlp_out.{layer}"][0].float() for layer in range(self.n_layers)])
        layers = [tc.encode_layer(mlp_in[layer], ZERO_POSITIONS) for layer, tc in enumerate(self.transcoders)]
        recon = torch.stack([c.reconstruction for c in layers])
        errors = mlp_out - recon
        errors[:, :ZERO_POSITIONS] = 0
        return Prepared(tokens.cpu(), logits, layers, mlp_in, mlp_out, errors, seen["embed"][0].float())

    def linear_forward(self, prep: Prepared, n_pos: int | None = None) -> LinearGraph:
        """The frozen replacement model's forward pass with autograd on (see the module docstring),
        over the first n_pos tokens (default all): the model is causal, so targets at earlier
        positions need only that prefix, and a shorter pass makes their backward passes cheaper.

        Each MLP output becomes linear_part(x) + C with C = mlp_out - linear_part(x_real), which is
        the features' decoder vectors plus the error node (at the BOS, whatever the real MLP wrote
        there): the real output's value, in which only b_dec + W_skip x carries gradients."""
        lm = self.lm
        n_pos = prep.n_pos if n_pos is None else n_pos
        out = LinearGraph(embeddings=torch.empty(0))
        const = []
        for layer, tc in enumerate(self.transcoders):
            # reconstruction + error is the real output: subtract the part that stays live from
            # that, rather than add up the nodes (which can be far larger than their sum).
            x = prep.mlp_in[layer, :n_pos]
            const.append((prep.mlp_out[layer, :n_pos] - tc.linear_part(x)).to(lm.device))

        def embed(e: torch.Tensor) -> torch.Tensor:
            leaf = e.detach().requires_grad_(True)
            out.embeddings = leaf
            return leaf

        def mlp_in(layer: int, x: torch.Tensor) -> None:
            out.mlp_in.append(x)

        def mlp_out(layer: int, _y: torch.Tensor) -> torch.Tensor:
            tc = self.transcoders[layer]
            new = tc.linear_part(out.mlp_in[layer]) + const[layer]
            if not tc.has_skip:  # b_dec + C is a constant: make it a leaf so gradients can be read there
                new = new.detach().requires_grad_(True)
            out.mlp_out.append(new)
            return new

        def final(h: torch.Tensor) -> None:
            out.final = h

        with ExitStack() as stack, torch.enable_grad():
            # Freezing hooks first: they must run before the hook that replaces Gemma 2's mlp_out,
            # which is its post-feedforward norm's output.
            for h in lm.freeze_for_attribution():
                stack.callback(h.remove)
            stack.callback(lm.hook_embedding(embed).remove)
            for layer in range(self.n_layers):
                stack.callback(lm.hook_site(Site("mlp_in", layer), lambda x, layer=layer: mlp_in(layer, x)).remove)
                stack.callback(lm.hook_site(Site("mlp_out", layer), lambda y, layer=layer: mlp_out(layer, y)).remove)
            stack.callback(lm.hook_final_norm(final).remove)
            out.logits = lm.model(input_ids=prep.tokens[None, :n_pos].to(lm.device), use_cache=False).logits
        if len(out.mlp_out) != self.n_layers or out.final is None:
            raise RuntimeError("the replacement model's hooks did not all fire")
        return out
