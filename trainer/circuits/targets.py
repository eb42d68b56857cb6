"""Logit targets of an attribution graph: which next-token logits get a node, and how much each
counts (circuit-tracer's AttributionTargets._from_salient and _compute_logit_vecs).

The most probable tokens at the last position are kept, in order of probability, up to and
including the first one at which their cumulative probability reaches `desired_prob`, at most
`max_n`. Each target's direction is its unembedding row minus the mean row over the vocabulary,
so its node measures the logit minus the mean logit (the "demeaned" logit), read off the final
norm's output. Its weight in influence and pruning is its probability under the real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitTargets:
    tokens: torch.Tensor
    """[k] long: vocabulary ids, most probable first."""
    probabilities: torch.Tensor
    """[k] float32: their softmax probabilities at the last position."""
    vectors: torch.Tensor
    """[k, D] float32: unembedding rows minus the mean row."""

    def __len__(self) -> int:
        return int(self.tokens.numel())


def salient_logits(logits: torch.Tensor, unembed: torch.Tensor, max_n: int = 10,
                   desired_prob: float = 0.95) -> LogitTargets:
    """logits [V] at the last position; unembed [V, D] (the LM head's weight)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(min(max_n, probs.numel()))
    # The first index at which the running sum reaches desired_prob is kept too (a left search);
    # when the sum never reaches it every one of the top max_n is kept.
    reached = (torch.cumsum(top_p, 0) >= desired_prob).nonzero()
    count = int(reached[0]) + 1 if len(reached) else len(top_p)
    return targets_for(top_i[:count], logits, unembed)


def targets_for(tokens: torch.Tensor, logits: torch.Tensor, unembed: torch.Tensor) -> LogitTargets:
    """Targets for given vocabulary ids (any order), with their probabilities and demeaned rows."""
    probs = torch.softmax(logits.float(), dim=-1)
    w = unembed.detach().float()
    vectors = w[tokens] - w.mean(0, keepdim=True)
    return LogitTargets(tokens.long(), probs[tokens], vectors)
