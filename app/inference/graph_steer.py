"""Steering from an attribution graph in the live model: one feature or error node of a stored
graph changed at its position, the real model run with that change (trainer.circuits.steer.steer_live).

The API sends what the graph's row records (its LM, dtype, transcoder set and prompt) with the
edit (GraphSteerService). The engine loads the LM at the graph's dtype and the one transcoder of
the node's block (registry.py, kept like any other entry), and answers on its own thread with one
forward pass of two rows. This service holds a graph's model only when the set's folder is on its
machine (409 otherwise) and it can load the LM (503 otherwise, as for published SAEs).
"""

from __future__ import annotations

from collections.abc import Callable

from app.inference.jobs import DirectJob
from app.inference.registry import TranscoderHandle
from app.inference.schemas import GraphSteerService, bad_input
from store.errors import AtlasError


class GraphSteerJob(DirectJob):
    kind = "graph_steer"

    def __init__(self, request: GraphSteerService, timeout_s: float, on_done: Callable):
        super().__init__([], timeout_s, on_done)
        self.request = request
        self.transcoder: TranscoderHandle | None = None
        self.edit = None

    def load(self, registry) -> None:
        r = self.request
        self.model = registry.model_named(r.model, registry.dtype_name(r.lm_dtype))
        self._pin(registry, self.model.key)
        if not 0 <= r.layer < self.model.lm.n_layers:
            raise bad_input(f"layer {r.layer} is outside 0..{self.model.lm.n_layers - 1} of {r.model}")
        self.transcoder = registry.transcoder(r.set_path, r.layer, self.model.lm)
        self._pin(registry, self.transcoder.key)

    def prepare(self, max_tokens: int) -> None:
        from trainer.circuits.steer import NodeEdit

        r = self.request
        try:
            self.edit = NodeEdit(r.kind, r.layer, r.position, r.feature, r.value, r.multiplier)
        except AtlasError as exc:
            raise bad_input(exc.one_line()) from None

    def run(self) -> dict:
        from trainer.circuits.steer import steer_live

        r = self.request
        try:
            res = steer_live(self.model.lm, self.transcoder.sae, r.prompt, self.edit, r.top_k, r.max_tokens, r.targets)
        except AtlasError as exc:
            raise bad_input(exc.one_line()) from None
        return {"activation": res.activation, "value": res.value, "before": res.before, "after": res.after,
                "targets": res.targets}
