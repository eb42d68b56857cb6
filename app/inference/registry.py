"""Models and published SAEs, loaded on first use and kept within a memory budget (LRU).

What the service loads is exactly what was analysed: the SAE folder the store records
(`saes.weights_path`, read with the same loader as `sae-atlas analyze`), the LM the analysis ran
(`lms.name`) at the precision the analysis used (`config.analysis.lm_dtype_used`, or its
`lm_dtype` setting resolved on this device for SAEs analysed before that was recorded), and the
same BOS / attention-sink masking. So a live activation equals the stored one up to float
rounding. The per-latent analysed max and density (for ranking and units) come from the
features table, once per published version.

Only the engine thread loads and evicts; entries in use by a running batch are pinned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from store.errors import AtlasError
from app.inference.schemas import ServiceError
from store.models import LM, SAE, Feature, SAEStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAEMeta:
    """A published SAE as the store describes it (cheap: one indexed query)."""

    id: int
    name: str
    version: str
    lm_id: int
    lm_name: str
    site: str
    d_in: int
    d_sae: int
    weights_path: str | None
    lm_dtype: str  # float32 / bfloat16 / float16, or "auto"
    sink_norm_ratio: float | None
    exclude_bos: bool

    @property
    def key(self) -> tuple:
        return ("sae", self.id, self.version)


def _meta(sae: SAE, lm: LM) -> SAEMeta:
    analysis = (sae.config or {}).get("analysis") or {}
    dtype = analysis.get("lm_dtype_used") or analysis.get("lm_dtype") or "auto"
    return SAEMeta(sae.id, sae.name, sae.version, lm.id, lm.name, sae.site, sae.d_in, sae.d_sae, sae.weights_path,
                   str(dtype), analysis.get("sink_norm_ratio", 10.0), bool(analysis.get("exclude_bos", True)))


def lookup_saes(engine: Engine, names: list[str] | None = None, model: str | None = None) -> list[SAEMeta]:
    """Published SAEs by name, or every SAE of `model` (default: of the first model with SAEs).
    All of them must read the same LM. Raises 404 / 422 as ServiceError."""
    with Session(engine) as session:
        q = select(SAE, LM).join(LM, SAE.lm_id == LM.id).where(SAE.status == SAEStatus.ready.value)
        if names:
            names = list(dict.fromkeys(names))
            if any("\x00" in n for n in names):
                raise ServiceError(404, "not_found", "no SAE has a NUL in its name")
            rows = session.execute(q.where(SAE.name.in_(names))).all()
            found = {s.name for s, _ in rows}
            missing = [n for n in names if n not in found]
            if missing:
                raise ServiceError(404, "not_found", f"no published SAE named {missing[0]!r}")
        else:
            if model is not None:
                if "\x00" in model or session.scalar(select(LM.id).where(LM.name == model)) is None:
                    raise ServiceError(404, "not_found", f"no model named {model!r}")
                q = q.where(LM.name == model)
            rows = session.execute(q.order_by(LM.name, SAE.layer, SAE.name)).all()
            if not rows:
                raise ServiceError(404, "not_found", "no published SAE" + (f" reads {model!r}" if model else ""))
            first_lm = rows[0][1].id
            rows = [r for r in rows if r[1].id == first_lm]
        metas = [_meta(s, lm) for s, lm in rows]
    lms = {m.lm_name for m in metas}
    if len(lms) > 1:
        raise ServiceError(422, "invalid_parameters",
                           f"the SAEs read different models ({', '.join(sorted(lms))}); use SAEs of one model")
    order = {n: i for i, n in enumerate(names or [])}
    return sorted(metas, key=lambda m: order.get(m.name, 0)) if names else metas


@dataclass
class ModelHandle:
    key: tuple
    lm: object  # trainer.lm.LoadedLM
    nbytes: int
    has_chat_template: bool

    @property
    def tokenizer(self):
        return self.lm.tokenizer


@dataclass
class SAEHandle:
    meta: SAEMeta
    sae: torch.nn.Module
    site: object  # trainer.lm.Site: what the encoder reads
    dec_norm: torch.Tensor  # [F] float32 on the device: shown activation = f * ||W_dec,i||
    max_act: np.ndarray  # [F] float64: the analysed max of the shown activation
    density: np.ndarray  # [F] float64: share of analysed tokens where it fires
    nbytes: int
    target_site: object = None  # trainer.lm.Site: where the decoder writes (a transcoder's output site; default `site`)
    max_act_t: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.max_act_t = torch.as_tensor(self.max_act, dtype=torch.float32, device=self.dec_norm.device)
        if self.target_site is None:
            self.target_site = self.site

    def shown(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return values.float() * self.dec_norm[indices]


@dataclass
class TranscoderHandle:
    """One block's transcoder of a graph's transcoder set (steering from a graph)."""

    key: tuple
    sae: torch.nn.Module
    nbytes: int
    name: str


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class Registry:
    def __init__(self, engine: Engine, device: str | None = None, budget_mb: float = 6144):
        from trainer.lm import pick_device

        self.engine = engine
        self.device = pick_device(device)
        self.budget = int(budget_mb * 2**20)
        self._entries: OrderedDict[tuple, ModelHandle | SAEHandle | TranscoderHandle] = OrderedDict()
        self._pins: dict[tuple, int] = {}
        self._lock = threading.Lock()  # guards the bookkeeping that status() reads from other threads
        self.loads = 0
        self.evictions = 0

    # --- bookkeeping ---------------------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def describe(self) -> list[dict]:
        with self._lock:
            out = []
            for key, e in self._entries.items():
                name = e.meta.name if isinstance(e, SAEHandle) else e.name if isinstance(e, TranscoderHandle) \
                    else f"{key[1]} ({key[2]})"
                out.append({"kind": key[0], "name": name, "mb": round(e.nbytes / 2**20, 1),
                            "pinned": self._pins.get(key, 0) > 0})
            return out

    def pin(self, key: tuple) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: tuple) -> None:
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n <= 0:
                self._pins.pop(key, None)
            else:
                self._pins[key] = n

    def _touch(self, key: tuple):
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
            return e

    def _make_room(self, need: int, what: str) -> None:
        if need > self.budget:
            raise ServiceError(503, "unavailable",
                               f"{what} needs {need / 2**20:.0f} MiB, more than the inference memory budget "
                               f"({self.budget / 2**20:.0f} MiB): raise SAE_ATLAS_INFERENCE_MEMORY_MB",
                               retry_after=60)
        with self._lock:
            used = sum(e.nbytes for e in self._entries.values())
            for key in list(self._entries):
                if used + need <= self.budget:
                    break
                if self._pins.get(key):
                    continue
                e = self._entries.pop(key)
                used -= e.nbytes
                self.evictions += 1
                log.info("unloaded %s (%.0f MiB) to stay within the memory budget", key, e.nbytes / 2**20)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _add(self, key: tuple, entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self.loads += 1

    # --- loading -------------------------------------------------------------------------------

    def resolve_dtype(self, meta: SAEMeta) -> str:
        return self.dtype_name(meta.lm_dtype)

    def dtype_name(self, setting: str) -> str:
        """float32 / bfloat16 / float16 for a dtype setting ("auto": what pick_dtype chooses on this device)."""
        from trainer.lm import pick_dtype

        return str(pick_dtype(None if setting == "auto" else setting, self.device)).removeprefix("torch.")

    def model(self, meta: SAEMeta) -> ModelHandle:
        return self.model_named(meta.lm_name, self.resolve_dtype(meta))

    def model_named(self, lm_name: str, dtype: str) -> ModelHandle:
        """The LM `lm_name` at `dtype` (float32 / bfloat16 / float16), loaded on first use."""
        key = ("model", lm_name, dtype)
        hit = self._touch(key)
        if hit is not None:
            return hit
        from trainer.lm import load_lm

        started = time.time()
        try:
            lm = load_lm(lm_name, self.device, dtype)
        except AtlasError as exc:
            raise ServiceError(503, "unavailable", f"the inference service cannot load model {lm_name!r}: "
                                                   f"{exc.one_line()}", retry_after=60) from None
        nbytes = _nbytes(lm.model)
        self._make_room(nbytes, f"model {lm_name}")
        handle = ModelHandle(key, lm, nbytes, bool(getattr(lm.tokenizer, "chat_template", None)))
        self._add(key, handle)
        log.info("loaded model %s (%s, %.0f MiB) in %.1f s", lm_name, dtype, nbytes / 2**20, time.time() - started)
        return handle

    def transcoder(self, set_path: str, layer: int, lm) -> TranscoderHandle:
        """Block `layer`'s transcoder of the set whose manifest is `set_path` (a graph's set),
        loaded on first use. 409 when this service does not hold that set or it does not fit `lm`."""
        from pathlib import Path

        from trainer.transcoders.sets import load_transcoder_set

        path = Path(set_path)
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            raise ServiceError(409, "conflict", f"the inference service does not hold the graph's transcoder set "
                                                f"({set_path} is not on its machine)") from None
        key = ("transcoder", str(path), layer, stamp)
        hit = self._touch(key)
        if hit is not None:
            return hit
        try:
            tset = load_transcoder_set(path, complete=False)
            if layer not in tset.layers:
                raise AtlasError(f"transcoder set {set_path} has no transcoder for block {layer}")
            loaded = tset.load(layer)
        except AtlasError as exc:
            raise ServiceError(409, "conflict", f"the inference service cannot use the graph's transcoder set: "
                                                f"{exc.one_line()}") from None
        sae = loaded.sae
        if sae.cfg.d_in != lm.d_model:
            raise ServiceError(409, "conflict", f"transcoder set {set_path} reads {sae.cfg.d_in}-dimensional "
                                                f"activations, the model has {lm.d_model}")
        sae = sae.to(self.device).eval().requires_grad_(False)
        nbytes = _nbytes(sae)
        self._make_room(nbytes, f"transcoder {layer} of {set_path}")
        handle = TranscoderHandle(key, sae, nbytes, f"{path.parent.name}/{layer}")
        self._add(key, handle)
        log.info("loaded transcoder %d of %s (%.0f MiB)", layer, set_path, nbytes / 2**20)
        return handle

    def sae(self, meta: SAEMeta, lm) -> SAEHandle:
        hit = self._touch(meta.key)
        if hit is not None:
            return hit
        from trainer.formats import load_sae

        if not meta.weights_path:
            raise ServiceError(503, "unavailable", f"SAE {meta.name!r} was published without a weights folder; "
                                                   "live inference needs it (republish from the SAE folder)")
        try:
            loaded = load_sae(meta.weights_path)
        except AtlasError as exc:
            raise ServiceError(503, "unavailable", f"cannot load the weights of SAE {meta.name!r}: {exc.one_line()}",
                               retry_after=60) from None
        sae = loaded.sae
        if (sae.cfg.d_in, sae.cfg.d_sae) != (meta.d_in, meta.d_sae):
            raise ServiceError(409, "conflict", f"the weights in {meta.weights_path} ({sae.cfg.d_sae} latents of "
                                                f"{sae.cfg.d_in}) are not the ones published as {meta.name!r}; republish it")
        if sae.cfg.d_in != lm.d_model:
            raise ServiceError(409, "conflict", f"SAE {meta.name!r} reads {sae.cfg.d_in}-dimensional activations, "
                                                f"model {meta.lm_name} has {lm.d_model}")
        with Session(self.engine) as session:
            rows = session.execute(select(Feature.index, Feature.max_act, Feature.density)
                                   .where(Feature.sae_id == meta.id)).all()
        max_act = np.zeros(meta.d_sae)
        density = np.zeros(meta.d_sae)
        if rows:
            idx = np.array([r[0] for r in rows], dtype=np.int64)
            max_act[idx] = [r[1] or 0.0 for r in rows]
            density[idx] = [r[2] or 0.0 for r in rows]
        sae = sae.to(self.device).eval().requires_grad_(False)
        nbytes = _nbytes(sae) + max_act.nbytes * 2
        self._make_room(nbytes, f"SAE {meta.name}")
        if loaded.transcoder and not loaded.output_site:
            raise ServiceError(409, "conflict", f"transcoder {meta.name!r} does not say which site it predicts; "
                                                "re-import it with --output-site and republish")
        # A transcoder's decoder writes its output site: steering pushes there, not at the site it reads.
        target = lm.site(loaded.output_site) if loaded.transcoder else None
        handle = SAEHandle(meta, sae, lm.site(meta.site), sae.W_dec.detach().norm(dim=1).float(), max_act, density,
                           nbytes, target)
        self._add(meta.key, handle)
        log.info("loaded SAE %s (%d latents, %.0f MiB)", meta.name, meta.d_sae, nbytes / 2**20)
        return handle
