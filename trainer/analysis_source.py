"""Where the analysis pass reads its contexts and activations: the LM, or the activation cache.

The LM path packs the split's documents into contexts and runs the LM to the SAE's site. The cache
path reads the same kind of contexts from an ActivationCache (trainer/activations.py) that training
or an earlier analysis wrote, so the analyses of a sweep's SAEs and the relations between them
reuse one LM pass over the corpus. The cache's valid-token mask is the one computed when it was
written (for a cache of several sites, the tokens valid at every site).
"""

from __future__ import annotations

import math

from trainer.activations import ActivationCache, LMStreamSpec, find_cache, valid_token_mask


class AnalysisSource:
    """Batches of contexts for the analysis pass of one SAE at one site."""

    def __init__(self, cfg, lm, site):
        self.cfg, self.lm, self.site = cfg, lm, site
        self.caches: list[ActivationCache] = []  # found (or filled) when the pass starts

    def describe(self) -> str:
        if not self.caches:
            return "lm"
        return "activation cache " + " + ".join(f"{c.spec.split}:{c.dir.name}" for c in self.caches)

    def _contexts(self):
        from trainer.corpus import Packer, open_corpus, split_documents

        c = self.cfg
        corpus = open_corpus(c.corpus, c.text_field)
        packer = Packer(self.lm.tokenizer, c.ctx_len, self.lm.bos_token_id, self.lm.separator_token_id)
        docs = split_documents(corpus, c.split, c.eval_fraction, c.seed)
        max_contexts = math.ceil(c.tokens / (c.ctx_len - 1))
        if corpus.finite:  # a small corpus may hold fewer contexts than asked for: say so in the progress bar
            from trainer.corpus import count_tokens

            available = count_tokens(corpus, self.lm.tokenizer, c.split, c.eval_fraction) // (c.ctx_len - 1)
            max_contexts = min(max_contexts, available)
        return packer.batches(docs, c.lm_batch_size, max_contexts=max_contexts), max_contexts

    def stream_spec(self, split: str) -> LMStreamSpec:
        """The activation stream this analysis reads (the cache it looks for is named by it)."""
        c = self.cfg
        return LMStreamSpec(model=c.model, sites=[c.site], corpus=c.corpus, text_field=c.text_field, ctx_len=c.ctx_len,
                            split=split, eval_fraction=c.eval_fraction, seed=c.seed, exclude_bos=c.exclude_bos,
                            sink_norm_ratio=c.sink_norm_ratio, lm_dtype=str(self.lm.dtype))

    def _find_caches(self) -> list[ActivationCache]:
        """The caches that hold this analysis's split for this site (training's cache of a sweep serves
        every site it read); for split 'all', the eval and train caches together. Fills one when none does."""
        from store.settings import get_settings

        c = self.cfg
        root = get_settings().data_dir / "activations"
        found = find_cache(root, self.stream_spec(c.split))
        if found is not None and found.covers(c.tokens):
            return [found]
        if c.split == "all":
            ev, tr = find_cache(root, self.stream_spec("eval")), find_cache(root, self.stream_spec("train"))
            if ev is not None and tr is not None and ev.meta().get("whole_split") and (
                    tr.meta().get("whole_split") or ev.meta()["tokens"] + tr.meta()["tokens"] >= c.tokens):
                return [ev, tr]
        return [ActivationCache(root, self.stream_spec(c.split)).fill(self.lm, c.tokens, c.lm_batch_size)]

    def batches(self, done_contexts: int):
        """(first_context, tokens, doc_ids, doc_pos, load) for each batch of contexts after done_contexts;
        load() -> (mask [B, T], x [n_valid, D]) runs the LM (or reads the cache) only when called."""
        c = self.cfg
        if c.cache_activations and not self.caches:
            self.caches = self._find_caches()
        if not self.caches:
            batches, max_contexts = self._contexts()

            def gen():
                seen = 0
                for batch in batches:
                    n_ctx = batch.tokens.shape[0]
                    if seen + n_ctx <= done_contexts:  # already in a shard: skip the LM
                        seen += n_ctx
                        continue

                    def load(batch=batch):
                        acts = self.lm.read(batch.tokens, [self.site])[self.site.name]
                        mask = valid_token_mask(acts, c.sink_norm_ratio, c.exclude_bos)
                        return mask, acts[mask]
                    yield seen, batch.tokens, batch.doc_ids, batch.doc_pos, load
                    seen += n_ctx
            return gen(), max_contexts
        available = sum(cache.meta()["contexts"] for cache in self.caches)
        max_contexts = min(math.ceil(c.tokens / (c.ctx_len - 1)), available)

        def gen_cached():
            offset = 0
            for cache in self.caches:
                n = cache.meta()["contexts"]
                if offset + n > done_contexts:
                    for b in cache.contexts([c.site], c.lm_batch_size, start_context=max(0, done_contexts - offset)):
                        first = offset + b.first_context
                        keep = min(b.tokens.shape[0], max_contexts - first)
                        if keep <= 0:
                            return

                        def load(b=b, keep=keep):
                            mask = b.mask[:keep]
                            return mask, b.activations(c.site)[:int(mask.sum())]
                        yield first, b.tokens[:keep], b.doc_ids[:keep], b.doc_pos[:keep], load
                offset += n
        return gen_cached(), max_contexts

