"""Transcoders trained here: from a trained transcoder to the saved standard form, and transcoder sets.

    train --site 'mlp.*'  ->  one LM pass reads mlp_in.L and mlp_out.L of every block (trainer.stream)
                          ->  each block's transcoder trains on its pair (trainer.train, loss on mlp_out.L)
                          ->  finished_transcoder: the standard form every reader of a saved transcoder uses
                          ->  out/<block folder>/ (a normal SAE folder) + out/transcoder_set.json

A transcoder in training follows sparsify's --transcode (trainer/sae/base.py); this package holds
what happens after training: fold.py turns it into the form saved transcoders have (encoder with
b_dec subtracted, input and output scales folded in, a skip term as SiteIO), and sets.py the
manifest that groups one model's per-block transcoders into a set that later code loads whole, and
publish_set.py publishes a set's blocks together and registers the set for attribution graphs.
"""

from trainer.transcoders.fold import finished_transcoder
from trainer.transcoders.publish_set import publish_transcoder_set
from trainer.transcoders.sets import (
    SET_FILE,
    SetLayer,
    TranscoderSet,
    load_transcoder_set,
    set_groups,
    write_transcoder_set,
)

__all__ = ["SET_FILE", "SetLayer", "TranscoderSet", "finished_transcoder", "load_transcoder_set",
           "publish_transcoder_set", "set_groups", "write_transcoder_set"]
