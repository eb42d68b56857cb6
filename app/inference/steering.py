"""Steering: the default and the steered continuation of a prompt, generated side by side.

Each request becomes two rows of one generation batch with the same prompt and the same seed:
row 0 runs the model as it is, row 1 with the interventions, applied by forward hooks at the
SAEs' sites on every position (the prompt's and each new token's):

- add:   x' = x + v * d_i,  v = s * m_i / ||d_i||  (s in units of m_i, the latent's analysed max,
         so the push is s * m_i along the unit direction d_i / ||d_i||)
- clamp: x' = x + (v - f_i(x)) * d_i  (f_i in the SAE's own units, so the latent reads s * m_i in
         shown units, and the SAE's error term x - x_hat is kept)

d_i is the decoder row W_dec,i; the push is made where the decoder writes (a transcoder's output
site, with f_i read from its input site in the same pass) and in the model's units (an SAE that
normalises its input scales its decoder output back per token, SparseAutoencoder.output_delta).

Several requests for the same model share a batch (prompts left-padded with an attention mask,
positions counted from each row's first real token), and the engine advances the batch one token
at a time between its encode passes. Sampling uses one torch.Generator per row seeded with the
request's seed, so with strength 0 (add) the steered row repeats the default row token for token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import torch

from app.inference.jobs import Job
from app.inference.registry import ModelHandle, SAEHandle, SAEMeta
from app.inference.schemas import ServiceError, SteerRequest, bad_input

log = logging.getLogger(__name__)


def _cache_argument() -> str:
    """transformers 5 renamed the KV cache argument (and output) from past_key_values to cache."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_argument()


class GenerateJob(Job):
    kind = "generate"

    def __init__(self, metas: list[SAEMeta], request: SteerRequest, timeout_s: float,
                 on_done: Callable, emit: Callable[[dict], None]):
        super().__init__(metas, timeout_s, on_done)
        self.request = request
        self.emit = emit
        self.prompt_ids: list[int] = []
        self.interventions: list[tuple[SAEHandle, int, float]] = []

    def prepare(self, max_tokens: int) -> None:
        r = self.request
        by_name = {s.meta.name: s for s in self.saes}
        for f in r.features:
            s = by_name[f.sae]
            if not 0 <= f.index < s.meta.d_sae:
                raise bad_input(f"SAE {f.sae!r} has latents 0..{s.meta.d_sae - 1}; {f.index} is out of range")
            if not s.max_act[f.index] > 0:
                raise bad_input(f"latent {f.index} of {f.sae!r} never fired in the analysis, so it has no max "
                                "activation to measure the strength in; pick another latent")
            self.interventions.append((s, f.index, f.strength))
        tok = self.model.tokenizer
        if r.chat_template:
            if not self.model.has_chat_template:
                raise bad_input(f"model {self.metas[0].lm_name} has no chat template; untick the chat template option")
            ids = tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = [self.model.lm.bos_token_id, *tok(r.prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > max_tokens + 1:
            raise bad_input(f"the prompt has {len(ids) - 1} tokens; the limit is {max_tokens} (SAE_ATLAS_INFERENCE_MAX_TOKENS)")
        if len(ids) < 2:
            raise bad_input("the prompt has no tokens")
        self.prompt_ids = ids


class _Row:
    def __init__(self, job: GenerateJob, steered: bool, seed: int, device: torch.device):
        self.job, self.steered = job, steered
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.ids: list[int] = []
        self.sent = ""
        self.done = False


def _eos_ids(model: ModelHandle) -> set[int]:
    ids = set()
    eos = model.tokenizer.eos_token_id
    if eos is not None:
        ids.add(int(eos))
    cfg = getattr(model.lm.model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(e) for e in extra)
    return ids


class GenerationBatch:
    """Default and steered rows of one or more steering jobs, advanced one token per step()."""

    def __init__(self, model: ModelHandle, jobs: list[GenerateJob]):
        self.model = model
        self.lm = model.lm
        self.jobs = jobs
        device = self.lm.device
        self.device = device
        self.rows: list[_Row] = []
        for job in jobs:
            self.rows.append(_Row(job, False, job.request.seed, device))
            self.rows.append(_Row(job, True, job.request.seed, device))
        self.eos = _eos_ids(model)
        self.pad = self.lm.separator_token_id
        self.cache = None
        self.step_no = 0
        self.started = time.monotonic()
        P = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(self.rows), P), self.pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), P), dtype=torch.long)
        for r, row in enumerate(self.rows):
            p = row.job.prompt_ids
            ids[r, P - len(p):] = torch.as_tensor(p)
            mask[r, P - len(p):] = 1
        self.next_ids = ids.to(device)
        self.mask = mask.to(device)
        self.hooks = self._hook_plan()
        for job in jobs:
            job.emit({"type": "start", "prompt_token_ids": job.prompt_ids})

    # --- interventions -------------------------------------------------------------------------

    def _hook_plan(self) -> dict[str, tuple[object, list[tuple[int, str, list]]]]:
        """target site name -> (Site, [(row, method, [(SAEHandle, latent, strength)])]). The push goes
        where the SAE's decoder writes: its own site, or a transcoder's output site."""
        plan: dict[str, tuple[object, list]] = {}
        for r, row in enumerate(self.rows):
            if not row.steered:
                continue
            by_site: dict[str, list] = {}
            for s, i, strength in row.job.interventions:
                by_site.setdefault(s.target_site.name, []).append((s, i, strength))
            for site_name, items in by_site.items():
                site = items[0][0].target_site
                plan.setdefault(site_name, (site, []))[1].append((r, row.job.request.method, items))
        return plan

    def _source_sites(self) -> dict[str, object]:
        """The input sites of the planned transcoders (read earlier in the same forward pass)."""
        return {s.site.name: s.site for _, rows_plan in self.hooks.values() for _, _, items in rows_plan
                for s, _, _ in items if s.site != s.target_site}

    @torch.inference_mode()
    def _apply(self, rows_plan: list, out: torch.Tensor, sources: dict[str, torch.Tensor]) -> torch.Tensor:
        """out [rows, T, D] at one target site, with each steered row's push added. A latent held at
        SAE activation c adds c * W_dec,i to the decoder output (add: c = v; clamp: c = v - f_i(x)),
        which output_delta turns into the model's units (an SAE that normalises its input)."""
        out = out.clone()
        for r, method, items in rows_plan:
            x = out[r].float()  # [T, D]
            by_sae: dict[tuple, list] = {}
            for s, i, strength in items:
                by_sae.setdefault(s.meta.key, []).append((s, i, strength))
            new = x
            for group in by_sae.values():
                s = group[0][0]
                dev = s.dec_norm.device
                # What the encoder reads: this site, or a transcoder's input site.
                x_in = (x if s.site == s.target_site else sources[s.site.name][r].float()).to(dev)
                latents = torch.tensor([i for _, i, _ in group], device=dev)
                # v: the SAE activation at which the latent shows strength x its analysed max
                shown = torch.tensor([strength * float(s.max_act[i]) for _, i, strength in group], device=dev)
                v = shown / s.dec_norm[latents]
                coef = v.expand(x_in.shape[0], -1)  # [T, n]
                if method != "add":
                    codes = s.sae.encode(x_in)
                    coef = coef - torch.stack([(codes.values * (codes.indices == i)).sum(-1).float()
                                               for i in latents.tolist()], -1)
                push = coef @ s.sae.W_dec.detach()[latents].float()
                new = new + s.sae.output_delta(push, x_in).to(x.device)
            out[r] = new.to(out.dtype)
        return out

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sources: dict[str, torch.Tensor] = {}
        handles = [self.lm.hook_site(site, partial(self._apply, rows_plan, sources=sources))
                   for site, rows_plan in self.hooks.values()]
        # Registered after the pushes, so a transcoder reads what the model computes with at its input.
        handles += [self.lm.capture(site, sources) for site in self._source_sites().values()]
        try:
            positions = (self.mask.cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1]:]
            out = self.lm.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                                use_cache=True, logits_to_keep=1, **{_CACHE_ARG: self.cache})
        finally:
            for h in handles:
                h.remove()
        self.cache = getattr(out, _CACHE_ARG)
        return out.logits[:, -1, :].float()

    # --- generation ----------------------------------------------------------------------------

    def active(self) -> bool:
        return any(not row.done for row in self.rows)

    @torch.inference_mode()
    def step(self) -> None:
        """Generate one token for every row (the first call also reads the prompts)."""
        for job in self.jobs:
            if job.finished:
                continue
            if job.cancelled or job.expired():
                for row in self.rows:
                    if row.job is job:
                        row.done = True
                job.complete(None, ServiceError(503, "timeout", "the steering request ran past its time limit "
                                                                "(SAE_ATLAS_INFERENCE_TIMEOUT_S)", retry_after=5)
                             if not job.cancelled else None)
        if not self.active():
            return
        logits = self._forward(self.next_ids)
        self.step_no += 1
        nxt = torch.empty(len(self.rows), dtype=torch.long)
        for r, row in enumerate(self.rows):
            if row.done:
                nxt[r] = self.pad
                continue
            t = row.job.request.temperature
            if t == 0:
                token = int(logits[r].argmax())
            else:
                probs = torch.softmax(logits[r] / t, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=row.generator))
            nxt[r] = token
            self._emit_token(row, token)
        self.next_ids = nxt[:, None].to(self.device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)], 1)
        for job in self.jobs:
            if not job.finished and all(row.done for row in self.rows if row.job is job):
                self._finish(job)

    def _emit_token(self, row: _Row, token: int) -> None:
        job = row.job
        name = "steered" if row.steered else "default"
        if token in self.eos:
            row.done = True
            rest = self.model.tokenizer.decode(row.ids, skip_special_tokens=True)[len(row.sent):]
            if rest:  # what was held back as half a character goes out as it is
                job.emit({"type": "token", "row": name, "token_id": None, "text": rest})
            return
        row.ids.append(token)
        row.done = len(row.ids) >= job.request.max_new_tokens
        text = self.model.tokenizer.decode(row.ids, skip_special_tokens=True)
        delta = ""
        if row.done or not text.endswith("\ufffd"):  # hold back half a UTF-8 character, unless it is the end
            delta, row.sent = text[len(row.sent):], text
        job.emit({"type": "token", "row": name, "token_id": token, "text": delta})

    def _finish(self, job: GenerateJob) -> None:
        tok = self.model.tokenizer
        result = {}
        for row in self.rows:
            if row.job is job:
                result["steered" if row.steered else "default"] = {
                    "text": tok.decode(row.ids, skip_special_tokens=True), "token_ids": row.ids}
        result["prompt_token_ids"] = job.prompt_ids
        job.emit({"type": "done", **result})
        job.complete(result)


@torch.inference_mode()
def next_token_logits(model: ModelHandle, prompt_ids: list[int], interventions: list[tuple[SAEHandle, int, float]],
                      method: str = "add") -> tuple[torch.Tensor, torch.Tensor]:
    """(default, steered) logits of the token after `prompt_ids`: the same machinery as generation,
    for calibration (a latent that promotes token t should raise t's probability)."""
    from app.inference.schemas import SteerFeature

    req = SteerRequest(prompt="x", features=[SteerFeature(sae=s.meta.name, index=i, strength=v)
                                             for s, i, v in interventions], method=method, max_new_tokens=1)
    job = GenerateJob([s.meta for s, _, _ in interventions], req, 60.0, lambda *_: None, lambda _e: None)
    job.model, job.prompt_ids, job.interventions = model, list(prompt_ids), list(interventions)
    batch = GenerationBatch(model, [job])
    logits = batch._forward(batch.next_ids)
    return logits[0], logits[1]
