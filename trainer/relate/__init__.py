"""Relations between two SAEs of one model: which latents correspond across layers, how latents
split as an SAE grows wider, and which latents of a wider SAE are new.

- candidates: decoder-cosine top-k in blocks (threshold-aware costs for JumpReLU, as in SAE Match);
- cofiring: Pearson correlation and co-firing rates of candidate pairs, streamed over data;
- matching: one-to-one min-cost matching with "unmatched" allowed (layer and seed pairs);
- splitting: parent -> children links labelled persisted, split, novel (width pairs);
- stitching: the held-out test that confirms a novel latent;
- pipeline: all of it from one pass over aligned activations; data: where those come from;
- store: relate published SAEs, store the result, and the pairs related at publish.
"""

from trainer.relate.pipeline import RelateConfig, Relation, Side, order_pair, relate_saes

__all__ = ["RelateConfig", "Relation", "Side", "order_pair", "relate_saes"]
