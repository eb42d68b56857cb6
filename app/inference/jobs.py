"""Units of work the engine runs: what each live request needs from a forward pass.

A job names the published SAEs it needs; the engine loads them (and their model) in its own
thread, tokenises the job's texts, feeds the texts into shared forward passes (encode.py) and
hands each text's codes back to the job, which keeps only what its answer needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from app.inference.encode import TextCodes
from app.inference.registry import ModelHandle, SAEHandle, SAEMeta
from app.inference.schemas import ServiceError, bad_input


class Job:
    kind = "encode"

    def __init__(self, metas: list[SAEMeta], timeout_s: float, on_done: Callable[[object, BaseException | None], None]):
        self.metas = metas
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.on_done = on_done
        self.cancelled = False
        self.finished = False
        self.model: ModelHandle | None = None
        self.saes: list[SAEHandle] = []
        self.pins: list[tuple] = []

    @property
    def model_key(self) -> tuple | None:
        return self.model.key if self.model is not None else None

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def complete(self, result=None, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.on_done(result, error)

    def load(self, registry) -> None:
        """Load the model and SAEs the job needs, pinned while it runs (the engine thread, before prepare)."""
        self.model = registry.model(self.metas[0])
        self._pin(registry, self.model.key)
        for meta in self.metas:
            sae = registry.sae(meta, self.model.lm)
            self._pin(registry, meta.key)
            self.saes.append(sae)

    def _pin(self, registry, key: tuple) -> None:
        registry.pin(key)
        self.pins.append(key)

    def prepare(self, max_tokens: int) -> None:
        """Tokenise and check the inputs (the model and SAEs are loaded by now)."""


class DirectJob(Job):
    """A job answered by one computation on the engine thread right after prepare (no batching)."""

    kind = "direct"

    def run(self):
        raise NotImplementedError


def tokenize(model: ModelHandle, text: str | None, token_ids: list[int] | None, max_tokens: int,
             truncate: bool = False) -> tuple[list[int], bool]:
    """BOS + the text's tokens, as the analysis packs a context. Returns (ids, truncated)."""
    lm = model.lm
    if token_ids is not None:
        vocab = lm.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_input(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        ids = list(token_ids)
    else:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise bad_input("the text has no tokens")
    truncated = False
    if len(ids) > max_tokens:
        if not truncate:
            raise bad_input(f"the text has {len(ids)} tokens; the limit is {max_tokens} "
                            "(SAE_ATLAS_INFERENCE_MAX_TOKENS)")
        ids, truncated = ids[:max_tokens], True
    return [lm.bos_token_id, *ids], truncated


class EncodeJob(Job):
    """A job whose texts go through encode_texts; subclasses reduce each text's codes."""

    def __init__(self, metas, timeout_s, on_done):
        super().__init__(metas, timeout_s, on_done)
        self.ids: list[list[int]] = []
        self.cursor = 0  # texts handed to a batch so far
        self.received = 0

    def remaining(self) -> int:
        return len(self.ids) - self.cursor

    def take(self) -> tuple[int, list[int]]:
        i = self.cursor
        self.cursor += 1
        return i, self.ids[i]

    def consume(self, i: int, codes: dict[tuple, TextCodes]) -> None:
        self.received += 1
        self.reduce(i, codes)
        if self.received == len(self.ids):
            self.complete(self.result())

    def reduce(self, i: int, codes: dict[tuple, TextCodes]) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class ActivationsJob(EncodeJob):
    """Some latents of one SAE on every token of one text."""

    def __init__(self, meta: SAEMeta, latents: list[int], text: str | None, token_ids: list[int] | None,
                 timeout_s, on_done):
        super().__init__([meta], timeout_s, on_done)
        self.latents, self.text, self.token_ids = latents, text, token_ids
        self.out: dict = {}

    def prepare(self, max_tokens: int) -> None:
        d_sae = self.metas[0].d_sae
        bad = next((i for i in self.latents if not 0 <= i < d_sae), None)
        if bad is not None:
            raise ServiceError(404, "not_found", f"SAE {self.metas[0].name!r} has latents 0..{d_sae - 1}; {bad} is out of range")
        ids, _ = tokenize(self.model, self.text, self.token_ids, max_tokens)
        self.ids = [ids]

    def reduce(self, i, codes):
        c = codes[self.metas[0].key]
        self.out = {"token_ids": self.ids[0], "masked": c.masked.tolist(),
                    "activations": [c.latent_per_token(j).tolist() for j in self.latents]}

    def result(self):
        return self.out


class SearchJob(EncodeJob):
    """Every latent of every given SAE on one text: the top ones by activation (relative to the
    latent's analysed max, or raw), over all tokens or the selected positions."""

    def __init__(self, metas: list[SAEMeta], text: str, positions: list[int] | None, rank_by: str,
                 density_min: float | None, density_max: float | None, limit: int, timeout_s, on_done):
        super().__init__(metas, timeout_s, on_done)
        self.text, self.positions, self.rank_by = text, positions, rank_by
        self.density_min, self.density_max, self.limit = density_min, density_max, limit
        self.out: dict = {}

    def prepare(self, max_tokens: int) -> None:
        ids, _ = tokenize(self.model, self.text, None, max_tokens)
        if self.positions is not None:
            past = [p for p in self.positions if p >= len(ids)]
            if past:
                raise bad_input(f"position {past[0]} is past the end of the text ({len(ids)} tokens with BOS)")
        self.ids = [ids]

    def reduce(self, i, codes):
        length = len(self.ids[0])
        select = None
        if self.positions is not None:
            select = torch.zeros(length, dtype=torch.bool)
            select[self.positions] = True
        scores, owners = [], []
        any_codes = None
        for s in self.saes:
            c = codes[s.meta.key]
            any_codes = c
            sel = None if select is None else select.to(c.values.device)
            pooled = c.pooled_max(s.meta.d_sae, sel)
            score = pooled / s.max_act_t.clamp_min(1e-12) if self.rank_by == "relative" else pooled.clone()
            ok = pooled > 0
            if self.rank_by == "relative":
                ok &= s.max_act_t > 0
            density = torch.as_tensor(s.density, dtype=torch.float32, device=pooled.device)
            if self.density_min is not None:
                ok &= density >= self.density_min
            if self.density_max is not None:
                ok &= density <= self.density_max
            scores.append(torch.where(ok, score, torch.full_like(score, -1.0)).cpu())
            owners.append((s, pooled.cpu()))
        if select is not None and any_codes is not None and bool((select.to(any_codes.masked.device) & ~any_codes.masked).sum() == 0):
            raise bad_input("the selected tokens are all masked (BOS or attention sinks); select other tokens")
        flat = torch.cat(scores)
        n = min(self.limit, int((flat >= 0).sum()))
        top = flat.topk(n).indices.tolist() if n else []
        offsets = np.cumsum([0] + [s.meta.d_sae for s in self.saes])
        items = []
        for t in top:
            k = int(np.searchsorted(offsets, t, side="right") - 1)
            s, pooled = owners[k]
            j = t - int(offsets[k])
            per_token = codes[s.meta.key].latent_per_token(j)
            shown = per_token if select is None else per_token * select.to(per_token.device)
            mx = float(s.max_act[j])
            items.append({"sae": s.meta.name, "index": j, "activation": float(pooled[j]),
                          "relative": float(pooled[j]) / mx if mx > 0 else None, "max_activation": mx,
                          "density": float(s.density[j]), "position": int(shown.argmax()),
                          "activations": per_token.tolist()})
        c0 = codes[self.saes[0].meta.key]
        self.out = {"token_ids": self.ids[0], "masked": c0.masked.tolist(), "items": items}

    def result(self):
        return self.out


class PoolJob(EncodeJob):
    """Many texts under every given SAE, each pooled by its max activation per latent (contrastive search)."""

    def __init__(self, metas: list[SAEMeta], texts: list[str], timeout_s, on_done):
        super().__init__(metas, timeout_s, on_done)
        self.texts = texts
        self.pooled: dict[tuple, np.ndarray] = {}
        self.truncated = 0

    def prepare(self, max_tokens: int) -> None:
        tok = self.model.tokenizer
        bos = self.model.lm.bos_token_id
        encoded = tok(self.texts, add_special_tokens=False)["input_ids"]
        self.ids = []
        for ids in encoded:
            if len(ids) > max_tokens:
                ids = ids[:max_tokens]
                self.truncated += 1
            self.ids.append([bos, *ids])
        self.pooled = {s.meta.key: np.zeros((len(self.ids), s.meta.d_sae), dtype=np.float32) for s in self.saes}

    def reduce(self, i, codes):
        for s in self.saes:
            self.pooled[s.meta.key][i] = codes[s.meta.key].pooled_max(s.meta.d_sae).cpu().numpy()

    def result(self):
        return {"pooled": [(s, self.pooled[s.meta.key]) for s in self.saes], "truncated": self.truncated}
