"""Every latent's dashboard from one streaming pass of the LM.

Pass 1 (the only one that reads activations: from the LM, or from the activation cache, see
analysis_source.py) reads held-out contexts, encodes them with the SAE, updates running statistics
for all latents at once (count, sum of a, a^2, a^3, a^4, max), measures what the SAE misses on the
same tokens (darkmatter.py), and writes the sparse codes plus the context tokens to disk shards.
After every shard the statistics are saved, so an interrupted analysis resumes from its last shard.

Pass 2 (disk only, now that every latent's max is known) computes exact histograms and interval
shares, and streams three per-latent selections: the top activations (one per document), random
examples from each of n_intervals equal-width intervals of [0, max], and a uniform random sample
of positive activations. Pass 3 cuts a window of tokens around each selected activation and
reads that latent's activation on every token of the window from the shards.

Memory is bounded by (latents x examples) plus one shard, whatever the number of tokens.
Weight-only panels (direct logit effects and decoder cosine neighbours) are computed in blocks.

Activations shown to users are f_i * ||W_dec,i||, i.e. in the units of the residual stream.
Settings: analysis_config.py; the running statistics of pass 1: latent_stats.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from store.errors import AtlasError
from store.models import ExampleKind
from trainer.analysis_config import ANALYSIS_DIR, AnalyzeConfig, resolve_defaults  # noqa: F401 (re-exported)
from trainer.analysis_source import AnalysisSource
from trainer.config import TOPK_FAMILY
from trainer.darkmatter import DarkMatter, DarkMatterConfig, spliced_summary, spliced_token_losses
from trainer.formats import LoadedSAE, check_native_hook, load_sae
from trainer.latent_stats import RunningStats
from trainer.progress import report as progress_report
from trainer.selection import TopPerGroup, uniform_key

log = logging.getLogger(__name__)

def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class Analyzer:
    def __init__(self, cfg: AnalyzeConfig, lm=None, loaded: LoadedSAE | None = None):
        cfg.validate()
        self.cfg = cfg
        self.loaded = loaded or load_sae(cfg.sae_dir)
        resolve_defaults(cfg, self.loaded)
        from trainer.lm import load_lm, pick_device

        self.device = pick_device(cfg.device)
        self.lm = lm or load_lm(cfg.model, self.device, cfg.lm_dtype)
        self.site = self.lm.site(cfg.site)
        # A transcoder is analysed on what it reads (its input site); its decoder directions, hence
        # the direct logit effects, live at its output site.
        loaded = self.loaded
        check_native_hook(loaded.native_hook, self.lm, loaded.output_site if loaded.transcoder else cfg.site,
                          cfg.site if loaded.transcoder else None)
        d_in = self.loaded.sae.cfg.d_in
        if d_in != self.lm.d_model:
            raise AtlasError(f"the SAE reads {d_in}-dimensional activations but {cfg.model} site {cfg.site} has {self.lm.d_model}",
                             "pass the --model and --site the SAE was trained on")
        self.sae = self.loaded.sae.to(self.device).eval()
        self.d_sae = self.sae.cfg.d_sae
        self.dec_norm = self.sae.W_dec.detach().norm(dim=1).float()
        self.out = cfg.out_dir
        self.shards = self.out / "shards"
        self.timings: dict[str, float] = {}
        self.dm: DarkMatter | None = None
        self.source = AnalysisSource(cfg, self.lm, self.site)

    # --- pass 1: the LM (or the activation cache) ---------------------------------------------

    def _contexts(self):
        """The LM path's context batches and their count (benchmarks and tests read them directly)."""
        return self.source._contexts()

    def _state(self) -> dict:
        path = self.out / "state.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {}

    def _new_darkmatter(self, max_contexts: int) -> DarkMatter | None:
        c = self.cfg
        # A transcoder's error is against its output site, which this pass does not read.
        if not c.dark_matter or self.loaded.transcoder:
            return None
        cfg = DarkMatterConfig(ridge=c.dm_ridge, warmup_tokens=c.dm_warmup_tokens, top_contexts=c.dm_top_contexts,
                               window_before=c.window_before, window_after=c.window_after)
        return DarkMatter(self.sae.cfg.d_in, c.ctx_len, self.lm.vocab_size, cfg, self.device,
                          expected_tokens=max_contexts * (c.ctx_len - 1))

    @torch.no_grad()
    def stream(self, progress: bool = True) -> RunningStats:
        from tqdm import tqdm

        c = self.cfg
        stats = RunningStats(self.d_sae, self.device)
        state = self._state()
        if state and (c.restart or state.get("identity") != c.identity()):
            if not c.restart:
                log.warning("the analysis in %s was made with other settings; starting again", self.out)
            shutil.rmtree(self.out, ignore_errors=True)
            state = {}
        self.shards.mkdir(parents=True, exist_ok=True)
        shard_list: list[dict] = state.get("shards", [])
        done_contexts = int(state.get("contexts_done", 0))
        batches, max_contexts = self.source.batches(done_contexts)
        dm = self.dm = self._new_darkmatter(max_contexts)
        if state.get("pass1_complete") or done_contexts:
            stats.load(np.load(self.out / "stats.npz"))
            if dm is not None:
                dm.load(np.load(self.out / "darkmatter_state.npz"))
        if state.get("pass1_complete"):
            return stats
        if done_contexts:
            log.info("resuming the analysis after %d contexts", done_contexts)
        T = c.ctx_len
        buf: dict[str, list] = {k: [] for k in ("tokens", "doc_ids", "doc_pos", "tok", "lat", "act")}
        buffered = 0
        seen = done_contexts
        started = time.time()
        bar = tqdm(total=max_contexts * (T - 1), initial=done_contexts * (T - 1), unit="tok", unit_scale=True,
                   desc="analysing", dynamic_ncols=True, disable=not progress, mininterval=1.0)

        def flush():
            nonlocal buffered, done_contexts
            if not buffered:
                return
            idx = len(shard_list)
            name = f"shard_{idx:05d}.npz"
            arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in buf.items()}
            _atomic_savez(self.shards / name, **arrays)
            shard_list.append({"file": name, "first_context": done_contexts, "contexts": buffered})
            done_contexts += buffered
            _atomic_savez(self.out / "stats.npz", **stats.state())
            if dm is not None:
                _atomic_savez(self.out / "darkmatter_state.npz", **dm.state())
            _atomic_json(self.out / "state.json", {"identity": c.identity(), "contexts_done": done_contexts,
                                                   "shards": shard_list, "config": asdict(c)})
            for v in buf.values():
                v.clear()
            buffered = 0

        for ctx0, tokens, doc_ids, doc_pos, load in batches:
            n_ctx = tokens.shape[0]
            seen = ctx0 + n_ctx
            mask, acts = load()
            x = acts.float().to(self.device)
            codes = self.sae.encode(x)
            values = codes.values.float() * self.dec_norm[codes.indices]
            active = values > 0
            token_ids = (torch.arange(ctx0, ctx0 + n_ctx, device=mask.device)[:, None] * T
                         + torch.arange(T, device=mask.device)[None, :])[mask].to(self.device)
            rows = torch.nonzero(active)[:, 0]
            lat = codes.indices[active]
            val = values[active]
            stats.update(lat, val, int(mask.sum()))
            if dm is not None:  # the SAE's error on the same tokens, for what it misses
                dm.update(x, x - self.sae.output(codes, x), mask, tokens, ctx0, doc_ids, doc_pos)
            buf["tokens"].append(tokens.numpy().astype(np.int32))
            buf["doc_ids"].append(doc_ids.numpy())
            buf["doc_pos"].append(doc_pos.numpy())
            buf["tok"].append(token_ids[rows].cpu().numpy())
            buf["lat"].append(lat.cpu().numpy().astype(np.int32))
            buf["act"].append(val.cpu().numpy().astype(np.float32))
            buffered += n_ctx
            bar.update(n_ctx * (T - 1))
            progress_report("analyze", seen * (T - 1), max_contexts * (T - 1), "tok")
            if buffered >= c.shard_contexts:
                flush()
        flush()
        bar.close()
        if not shard_list:
            raise AtlasError(f"no contexts to analyse in the {c.split} split of {c.corpus}",
                             "use --split all, a larger corpus or a shorter --ctx-len")
        _atomic_json(self.out / "state.json", {"identity": c.identity(), "contexts_done": done_contexts,
                                               "shards": shard_list, "config": asdict(c), "pass1_complete": True})
        self.timings["pass1_s"] = time.time() - started
        return stats

    # --- what the SAE misses -----------------------------------------------------------------------

    def _sample_contexts(self, n: int) -> torch.Tensor:
        """The first n analysed contexts, read back from the shards."""
        parts, have = [], 0
        for _, z in self._iter_shards():
            parts.append(z["tokens"][:n - have])
            have += len(parts[-1])
            if have >= n:
                break
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros(0, self.cfg.ctx_len)

    @torch.no_grad()
    def dark_matter(self) -> dict:
        """Finish the dark-matter statistics and add the per-token spliced-loss sample."""
        c = self.cfg
        started = time.perf_counter()
        out = self.dm.finalize()
        out["spliced"] = None
        if c.dm_ce_contexts:
            contexts = self._sample_contexts(c.dm_ce_contexts)
            if contexts.shape[0]:
                d_ce, kl = spliced_token_losses(self.lm, self.site, lambda a: self.sae(a.to(self.device)), contexts,
                                                c.exclude_bos, c.sink_norm_ratio)
                out["spliced"] = spliced_summary(d_ce, kl, contexts, (c.window_before, c.window_after))
        out["site"], out["ctx_len"] = c.site, c.ctx_len
        out["timings"] = {"in_pass_s": self.dm.elapsed, "finish_s": time.perf_counter() - started}
        return out

    # --- pass 2: selections and exact histograms -------------------------------------------------

    def _iter_shards(self):
        for sh in self._state()["shards"]:
            with np.load(self.shards / sh["file"]) as z:
                yield sh, {k: z[k] for k in z.files}

    @torch.no_grad()
    def select(self, stats: RunningStats) -> dict:
        c = self.cfg
        F, T = self.d_sae, c.ctx_len
        dev = self.device
        top = TopPerGroup(F, c.n_top, dedupe=True, device=dev)
        intervals = TopPerGroup(F * c.n_intervals, c.per_interval, device=dev)
        sample = TopPerGroup(F, max(c.n_random, 1), device=dev)
        hist = torch.zeros(F * c.hist_bins, dtype=torch.int64, device=dev)
        interval_count = torch.zeros(F * c.n_intervals, dtype=torch.int64, device=dev)
        peak_max = stats.max.clamp_min(1e-30)
        for sh, z in self._iter_shards():
            if z["lat"].size == 0:
                continue
            tok = torch.from_numpy(z["tok"]).to(dev)
            lat = torch.from_numpy(z["lat"]).to(dev).long()
            act = torch.from_numpy(z["act"]).to(dev).double()
            first = sh["first_context"] * T
            doc = torch.from_numpy(z["doc_ids"]).reshape(-1).to(dev).long()[tok - first]
            rel = act / peak_max[lat]
            b_hist = (rel * c.hist_bins).long().clamp_(0, c.hist_bins - 1)
            hist.index_add_(0, lat * c.hist_bins + b_hist, torch.ones_like(lat))
            b_int = (rel * c.n_intervals).long().clamp_(0, c.n_intervals - 1)
            g_int = lat * c.n_intervals + b_int
            interval_count.index_add_(0, g_int, torch.ones_like(lat))
            top.update(lat, act, tok, doc)
            intervals.update(g_int, -uniform_key(tok, lat, seed=c.seed + 1), tok)
            if c.n_random:
                sample.update(lat, -uniform_key(tok, lat, seed=c.seed + 2), tok)
        return {"top": top, "intervals": intervals, "sample": sample,
                "hist": hist.view(F, c.hist_bins), "interval_count": interval_count.view(F, c.n_intervals)}

    # --- pass 3: windows -------------------------------------------------------------------------

    @torch.no_grad()
    def windows(self, sel: dict) -> dict[str, np.ndarray]:
        c = self.cfg
        F, T = self.d_sae, c.ctx_len
        W = c.window_before + c.window_after + 1
        feats, kinds, ranks, ints, toks = [], [], [], [], []

        def add(tpg: TopPerGroup, kind: int, per_group_interval: int | None):
            g, r = torch.nonzero(tpg.token >= 0, as_tuple=True)
            feats.append((g // per_group_interval if per_group_interval else g).cpu())
            ints.append((g % per_group_interval if per_group_interval else torch.full_like(g, -1)).cpu())
            kinds.append(torch.full_like(g, int(kind)).cpu())
            ranks.append(r.cpu())
            toks.append(tpg.token[g, r].cpu())

        add(sel["top"], ExampleKind.top, None)
        add(sel["intervals"], ExampleKind.interval, c.n_intervals)
        if c.n_random:
            add(sel["sample"], ExampleKind.random, None)
        feat = torch.cat(feats).numpy().astype(np.int32)
        kind = torch.cat(kinds).numpy().astype(np.int8)
        rank = torch.cat(ranks).numpy().astype(np.int16)
        interval = torch.cat(ints).numpy().astype(np.int8)
        tok = torch.cat(toks).numpy().astype(np.int64)
        E = len(feat)
        out_tokens = np.full((E, W), -1, dtype=np.int32)
        out_acts = np.zeros((E, W), dtype=np.float32)
        peak_act = np.zeros(E, dtype=np.float32)
        doc_id = np.zeros(E, dtype=np.int32)
        doc_pos = np.zeros(E, dtype=np.int32)
        order = np.argsort(tok, kind="stable")
        shard_bounds = []
        for sh, _ in ((sh, None) for sh in self._state()["shards"]):
            shard_bounds.append((sh["first_context"] * T, (sh["first_context"] + sh["contexts"]) * T, sh))
        offsets = np.arange(-c.window_before, c.window_after + 1)
        pos_in_order = 0
        for lo, hi, sh in shard_bounds:
            end = np.searchsorted(tok[order], hi, side="left")
            idx = order[pos_in_order:end]
            pos_in_order = end
            if idx.size == 0:
                continue
            with np.load(self.shards / sh["file"]) as z:
                tokens, docs, dpos = z["tokens"], z["doc_ids"], z["doc_pos"]
                key = (z["tok"].astype(np.int64) - lo) * F + z["lat"].astype(np.int64)
                act = z["act"]
            sort = np.argsort(key, kind="stable")
            key, act = key[sort], act[sort]
            t_local = tok[idx] - lo
            ctx, pos = t_local // T, t_local % T
            p = pos[:, None] + offsets[None, :]
            ok = (p >= (1 if c.exclude_bos else 0)) & (p < T)
            p_clip = np.clip(p, 0, T - 1)
            out_tokens[idx] = np.where(ok, tokens[ctx[:, None], p_clip], -1)
            q = (ctx[:, None] * T + p_clip) * F + feat[idx][:, None].astype(np.int64)
            found = np.searchsorted(key, q.ravel()).reshape(q.shape)
            found_c = np.minimum(found, len(key) - 1)
            hit = ok & (key[found_c] == q) if len(key) else np.zeros_like(ok)
            out_acts[idx] = np.where(hit, act[found_c] if len(key) else 0.0, 0.0)
            peak_act[idx] = out_acts[idx][:, c.window_before]
            doc_id[idx] = docs[ctx, pos]
            doc_pos[idx] = dpos[ctx, pos]
        return {"feature": feat, "kind": kind, "rank": rank, "interval": interval, "token": tok,
                "activation": peak_act, "doc_id": doc_id, "doc_pos": doc_pos,
                "tokens": out_tokens, "acts": out_acts.astype(np.float16), "peak": np.full(E, c.window_before, np.int16)}

    # --- weight-only panels ----------------------------------------------------------------------

    @torch.no_grad()
    def logit_effects(self, block: int = 512) -> dict[str, np.ndarray]:
        c = self.cfg
        w_u = self.lm.direct_logit_weights().to(self.device)  # [V, D]
        directions = self.sae.W_dec.detach().float()
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        F = directions.shape[0]
        n = min(c.n_logits, w_u.shape[0])
        top_ids = np.zeros((F, n), np.int32)
        top_val = np.zeros((F, n), np.float32)
        bot_ids = np.zeros((F, n), np.int32)
        bot_val = np.zeros((F, n), np.float32)
        hist = np.zeros((F, c.logit_hist_bins), np.int32)
        lo_hi = np.zeros((F, 2), np.float32)
        for s in range(0, F, block):
            logits = directions[s:s + block] @ w_u.T  # [b, V]
            tv, ti = logits.topk(n, dim=1)
            bv, bi = logits.topk(n, dim=1, largest=False)
            top_ids[s:s + block], top_val[s:s + block] = ti.cpu().numpy(), tv.cpu().numpy()
            bot_ids[s:s + block], bot_val[s:s + block] = bi.cpu().numpy(), bv.cpu().numpy()
            lo, hi = logits.min(dim=1).values, logits.max(dim=1).values
            span = (hi - lo).clamp_min(1e-12)
            nb = c.logit_hist_bins
            bins = ((logits - lo[:, None]) / span[:, None] * nb).to(torch.int32).clamp_(0, nb - 1)
            bins += (torch.arange(logits.shape[0], dtype=torch.int32, device=logits.device) * nb)[:, None]
            # one flat bincount over (row, bin): faster than a scatter_add into [b, bins]
            counts = torch.bincount(bins.view(-1), minlength=logits.shape[0] * nb).view(-1, nb)
            hist[s:s + block] = counts.cpu().numpy()
            lo_hi[s:s + block, 0], lo_hi[s:s + block, 1] = lo.cpu().numpy(), hi.cpu().numpy()
        return {"logit_top_ids": top_ids, "logit_top": top_val, "logit_bottom_ids": bot_ids, "logit_bottom": bot_val,
                "logit_hist": hist, "logit_range": lo_hi}

    def neighbors(self) -> dict[str, np.ndarray]:
        return decoder_neighbors(self.sae.W_dec, self.cfg.n_neighbors)

    # --- what fires together, and groups of latents that act as one feature -------------------

    def _codes(self, with_vocab: bool = False):
        """A fresh iterator over the shards' codes: (token index, latent[, activation, vocabulary id])."""
        T = self.cfg.ctx_len
        for sh, z in self._iter_shards():
            if not with_vocab:
                yield z["tok"], z["lat"]
            else:
                flat = z["tokens"].reshape(-1)
                yield z["tok"], z["lat"], z["act"], flat[z["tok"] - sh["first_context"] * T] if len(z["tok"]) else z["tok"]

    def structure(self, stats: RunningStats, neighbors: dict[str, np.ndarray]):
        """Co-firing partners of every latent and, unless --no-groups, the measured groups."""
        from trainer.relate.cofiring import cofiring_partners
        from trainer.structure.groups import (
            GroupConfig,
            collect_group_codes,
            find_groups,
            measure_groups,
        )

        c = self.cfg
        counts = stats.count.cpu().numpy()
        partners = cofiring_partners(self._codes, self.d_sae, stats.n_tokens, c.n_cofire, c.cofire_min_count,
                                     counts=counts)
        if not c.groups:
            return partners, None
        gcfg = GroupConfig(seed=c.seed)
        directions = self.sae.W_dec.detach().float().cpu().numpy()
        groups = find_groups(directions, partners, gcfg, (neighbors["neighbor_ids"], neighbors["neighbor_cos"]))
        sampled = collect_group_codes(groups, self.d_sae, counts, lambda: self._codes(True), gcfg)
        return partners, {"config": asdict(gcfg), "groups": measure_groups(groups, directions, sampled, gcfg)}

    # --- the whole analysis ----------------------------------------------------------------------

    def complete(self) -> bool:
        """Whether a finished analysis with these settings is already in the output folder."""
        return (not self.cfg.restart and (self.out / "DONE").is_file()
                and self._state().get("identity") == self.cfg.identity())

    def run(self, progress: bool = True) -> Path:
        c = self.cfg
        state = self._state()
        if self.complete():
            log.info("the analysis in %s is already complete", self.out)
            return self.out
        if state.get("pass1_complete") and not (self.out / "DONE").is_file() and not all(
                (self.shards / sh["file"]).is_file() for sh in state.get("shards", [])):
            log.warning("the analysis in %s lost its shards; starting again", self.out)
            shutil.rmtree(self.out, ignore_errors=True)
        t0 = time.time()
        stats = self.stream(progress)
        progress_report("select", 0, 1, force=True)
        dark = self.dark_matter() if self.dm is not None else None
        t1 = time.time()
        sel = self.select(stats)
        examples = self.windows(sel)
        t2 = time.time()
        logits = self.logit_effects()
        neighbors = self.neighbors()
        t3 = time.time()
        partners, groups = self.structure(stats, neighbors)
        t4 = time.time()
        n_tok = max(stats.n_tokens, 1)
        count = stats.count.cpu().numpy()
        density = count / n_tok
        moments = stats.moments()
        peak_token, peak_share = _peak_tokens(examples, self.d_sae)
        features = {
            "count": count, "density": density, "max": stats.max.cpu().numpy(), **moments,
            "hist": sel["hist"].cpu().numpy().astype(np.int32),
            "interval_count": sel["interval_count"].cpu().numpy().astype(np.int32),
            "peak_token": peak_token, "peak_token_share": peak_share, **logits, **neighbors,
        }
        _atomic_savez(self.out / "features.npz", **features)
        _atomic_savez(self.out / "examples.npz", **examples)
        _atomic_savez(self.out / "cofiring.npz", **partners.arrays())
        if groups is not None:
            _atomic_json(self.out / "groups.json", groups)
        vocab = self.lm.vocab_strings()
        _atomic_json(self.out / "vocab.json", vocab)
        summary = self.summary(density, n_tok)
        summary["analysis"]["source"] = self.source.describe()
        summary["timings"] = {"pass1_s": self.timings.get("pass1_s", t1 - t0), "select_and_windows_s": t2 - t1,
                              "logits_and_neighbors_s": t3 - t2, "cofiring_and_groups_s": t4 - t3, "total_s": time.time() - t0}
        if dark is not None:
            summary["timings"]["dark_matter_s"] = dark["timings"]["in_pass_s"] + dark["timings"]["finish_s"]
            _atomic_json(self.out / "darkmatter.json", dark)
        _atomic_json(self.out / "summary.json", summary)
        if not c.keep_shards:
            shutil.rmtree(self.shards, ignore_errors=True)
        (self.out / "DONE").write_text(json.dumps(summary["timings"]))
        return self.out

    def summary(self, density: np.ndarray, n_tokens: int) -> dict:
        c = self.cfg
        log_density = np.log10(np.clip(density, 1e-10, None))
        alive = density > 0
        edges = np.linspace(-8, 0, 49)
        counts, _ = np.histogram(np.clip(log_density[alive], -8, 0), bins=edges)
        lm = self.lm
        return {
            "sae": {"architecture": self.loaded.architecture, "d_in": self.sae.cfg.d_in, "d_sae": self.d_sae,
                    "k": self.sae.cfg.k if self.loaded.architecture in TOPK_FAMILY else None,
                    "site": c.site, "kind": self.loaded.kind, "output_site": self.loaded.output_site,
                    "source_format": self.loaded.source_format,
                    "norm_scale": float(self.loaded.meta.get("norm_scale_folded", 1.0)), "config": self.loaded.meta.get("sae", {}),
                    "training": self.loaded.meta.get("training", {})},
            "metrics": self.loaded.metrics,
            "lm": {"name": c.model, "source": lm.source, "architecture": getattr(lm.config, "model_type", ""),
                   "n_layers": lm.n_layers, "d_model": lm.d_model, "vocab_size": lm.vocab_size, "bos_token_id": lm.bos_token_id},
            # lm_dtype_used: the precision "auto" resolved to, so live inference can reproduce these values
            "analysis": {**{k: v for k, v in asdict(c).items()}, "n_tokens": n_tokens,
                         "lm_dtype_used": str(lm.dtype).removeprefix("torch.")},
            "log_density_hist": {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int((~alive).sum())},
            "dead": np.nonzero(~alive)[0].tolist(),
            "dense": np.nonzero(density > c.dense_threshold)[0].tolist(),
        }


def _peak_tokens(examples: dict[str, np.ndarray], d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: the token most of its top examples peak on, and the share that do."""
    peak_token = np.full(d_sae, -1, dtype=np.int32)
    share = np.zeros(d_sae, dtype=np.float32)
    top = examples["kind"] == ExampleKind.top
    if not top.any():
        return peak_token, share
    f = examples["feature"][top].astype(np.int64)
    t = examples["tokens"][top, examples["peak"][top][0]].astype(np.int64)
    pairs, counts = np.unique(np.stack([f, t], 1), axis=0, return_counts=True)
    order = np.lexsort((-counts, pairs[:, 0]))
    pairs, counts = pairs[order], counts[order]
    first = np.ones(len(pairs), bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    totals = np.bincount(f, minlength=d_sae)
    peak_token[pairs[first, 0]] = pairs[first, 1]
    share[pairs[first, 0]] = counts[first] / np.maximum(totals[pairs[first, 0]], 1)
    return peak_token, share


def analyze(cfg: AnalyzeConfig, lm=None, progress: bool = True) -> Path:
    return Analyzer(cfg, lm).run(progress)


@torch.no_grad()
def decoder_neighbors(W_dec: torch.Tensor, k: int, block: int = 1024) -> dict[str, np.ndarray]:
    """Each latent's k nearest latents by the cosine of their decoder directions (exact, blocked):
    {"neighbor_ids": [F, k] int32, "neighbor_cos": [F, k] float32}, nearest first."""
    d = W_dec.detach().float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = d.shape[0]
    k = min(k, F - 1)
    ids = np.zeros((F, max(k, 0)), np.int32)
    cos = np.zeros((F, max(k, 0)), np.float32)
    if k <= 0:
        return {"neighbor_ids": ids, "neighbor_cos": cos}
    for s in range(0, F, block):
        sims = d[s:s + block] @ d.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + s] = float("-inf")  # not its own neighbour
        v, i = sims.topk(k, dim=1)
        ids[s:s + block], cos[s:s + block] = i.cpu().numpy(), v.cpu().numpy()
    return {"neighbor_ids": ids, "neighbor_cos": cos}
