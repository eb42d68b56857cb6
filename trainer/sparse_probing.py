"""Sparse probing, as SAEBench (sae-bench 0.6.0, `sparse_probing`) defines it, on tasks built from
the corpus (trainer/probing_tasks.py).

For every text: BOS, then its tokens cut to `ctx_len` in all; the LM's activations at the SAE's
site, and the SAE's codes of each token, are averaged over the text's tokens with BOS, EOS and
padding left out (SAEBench zeroes those positions and divides by the count of the others). Attention
sinks are not dropped here: SAEBench drops only those three token ids.

For every class of a task, a binary problem, the class against the task's others: all the class's
texts are positives; negatives are ceil(n_pos / (classes - 1)) texts drawn at random from each other
class, cut to n_pos at random (balanced), on the train and on the test split alike. Then:

- a probe on all the LM's activations (`llm_test_accuracy`) and on all the SAE's codes
  (`sae_test_accuracy`);
- top-k probes (`llm_top_{k}_test_accuracy`, `sae_top_{k}_test_accuracy`): the k dimensions with
  the largest |mean over positives - mean over negatives| on the train split, and a probe on those.

Every probe is scikit-learn's L2 logistic regression (C = 1, at most 1,000 iterations), accuracy on
the test split. SAEBench trains its full-width probes with AdamW on the GPU for up to 100 epochs and
keeps the epoch with the best *test* accuracy; here the full-width probes are the same logistic
regression as the top-k ones, which picks nothing on the test split (the conformance script in
benchmarks/peers/saebench_conformance.py runs both). A task's number is the mean over its classes;
the card's, the mean over tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from store.errors import AtlasError


def dense_encoder(sae, norm_scale: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [n, D] raw activations -> dense codes [n, d_sae] float32 (our SAEs return sparse Codes)."""
    d_sae = sae.cfg.d_sae

    def encode(x: torch.Tensor) -> torch.Tensor:
        p = next(sae.parameters())
        return sae.encode(x.to(p.device, torch.float32) * norm_scale).dense(d_sae).float().cpu()
    return encode


def text_tokens(tokenizer, texts: list[str], bos_id: int, ctx_len: int) -> list[list[int]]:
    """BOS then each text's tokens, at most ctx_len ids in all."""
    if ctx_len < 2:
        raise AtlasError(f"--ctx-len {ctx_len} is too short for probing", "use 128")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[bos_id] + list(t)[:ctx_len - 1] for t in ids]


def special_ids(lm) -> set[int]:
    """Token ids SAEBench leaves out of the mean: BOS, EOS and padding."""
    tok = lm.tokenizer
    return {int(i) for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, lm.bos_token_id) if i is not None}


@torch.no_grad()
def pooled_activations(lm, site: str, texts: list[str], ctx_len: int = 128, batch_size: int = 16,
                       encode: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """(mean LM activations [N, D], mean SAE codes [N, F] or None) over each text's tokens, BOS,
    EOS and padding left out. `encode` maps activations [n, D] (float32) to codes [n, F]."""
    st = lm.site(site)
    skip = special_ids(lm)
    pad = lm.separator_token_id
    seqs = text_tokens(lm.tokenizer, texts, lm.bos_token_id, ctx_len)
    acts_out, codes_out = [], []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, s in enumerate(batch):  # padded on the right: a causal model's earlier tokens do not see it
            ids[i, :len(s)] = torch.tensor(s)
        keep = torch.ones_like(ids, dtype=torch.bool)
        for t in skip:
            keep &= ids != t
        for i, s in enumerate(batch):
            keep[i, len(s):] = False
        a = lm.read(ids, [st])[st.name].float().cpu()
        n = keep.sum(1, keepdim=True).clamp(min=1).float()
        w = keep.float()[:, :, None]
        acts_out.append(((a * w).sum(1) / n).numpy())
        if encode is not None:
            flat = a[keep]
            codes = encode(flat).float().cpu()
            sums = torch.zeros(len(batch), codes.shape[1])
            rows = keep.nonzero()[:, 0]
            sums.index_add_(0, rows, codes)
            codes_out.append((sums / n).numpy())
    acts = np.concatenate(acts_out).astype(np.float32)
    return acts, (np.concatenate(codes_out).astype(np.float32) if encode is not None else None)


def one_vs_rest(data: dict[str, np.ndarray], positive: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) for `positive` against the other classes, balanced as SAEBench balances it."""
    pos = data[positive]
    others = [c for c in data if c != positive]
    if not others:
        raise AtlasError("a probing task needs at least two classes")
    per = math.ceil(len(pos) / len(others))
    neg = np.concatenate([data[c][rng.permutation(len(data[c]))[:per]] for c in others])
    neg = neg[rng.permutation(len(neg))[:len(pos)]]
    if len(neg) < len(pos):
        raise AtlasError(f"class {positive!r} has {len(pos)} texts but its negatives only {len(neg)}")
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)])
    order = rng.permutation(len(x))
    return x[order], y[order]


def top_k_dims(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k dimensions with the largest |mean(positives) - mean(negatives)| (largest first)."""
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of an L2 logistic-regression probe (scikit-learn, C = 1, max_iter 1000)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=1000).fit(x_train, y_train)
    return float((probe.predict(x_test) == y_test).mean())


def class_accuracies(train: dict[str, np.ndarray], test: dict[str, np.ndarray], ks: tuple[int, ...],
                     seed: int = 0, full: bool = True, keep: dict | None = None) -> dict[str, dict[str, float]]:
    """{class: {"test_accuracy": a, "top_{k}_test_accuracy": a, ...}} for one task's pooled arrays;
    `keep`, when given, receives each class's balanced (x_train, y_train, x_test, y_test)."""
    if set(train) != set(test):
        raise AtlasError("the train and test splits of a probing task have different classes")
    dims = {x.shape[1] for x in (*train.values(), *test.values())}
    if len(dims) != 1:
        raise AtlasError(f"probing arrays have different widths {sorted(dims)}")
    if any(k < 1 for k in ks):
        raise AtlasError(f"top-k probes need k >= 1, got {list(ks)}")
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for c in train:
        xtr, ytr = one_vs_rest(train, c, rng)
        xte, yte = one_vs_rest(test, c, rng)
        if keep is not None:
            keep[c] = (xtr, ytr, xte, yte)
        row = {}
        if full:
            row["test_accuracy"] = probe_accuracy(xtr, ytr, xte, yte)
        for k in ks:
            idx = top_k_dims(xtr, ytr, k)
            row[f"top_{k}_test_accuracy"] = probe_accuracy(xtr[:, idx], ytr, xte[:, idx], yte)
        out[c] = row
    return out


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def sparse_probing(lm, site: str, tasks, encode, ks: tuple[int, ...] = (1, 2, 5), ctx_len: int = 128,
                   batch_size: int = 16, seed: int = 0, sae_full: bool = True, progress=None) -> dict:
    """The sparse-probing part of a report card: per task and class, and means (module docstring)."""
    per_task = {}
    for task in tasks:
        pooled = {}
        for split, data in (("train", task.train), ("test", task.test)):
            pooled[split] = {}
            for c, texts in data.items():
                pooled[split][c] = pooled_activations(lm, site, texts, ctx_len, batch_size, encode)
                if progress:
                    progress(len(texts))
        llm = class_accuracies({c: v[0] for c, v in pooled["train"].items()},
                               {c: v[0] for c, v in pooled["test"].items()}, ks, seed)
        sae = class_accuracies({c: v[1] for c, v in pooled["train"].items()},
                               {c: v[1] for c, v in pooled["test"].items()}, ks, seed, full=sae_full)
        classes = {c: {**{f"llm_{k}": v for k, v in llm[c].items()}, **{f"sae_{k}": v for k, v in sae[c].items()}}
                   for c in task.classes}
        per_task[task.name] = {**task.summary(), "per_class": classes, **mean_rows(list(classes.values()))}
    means = mean_rows([{k: v for k, v in t.items() if k.endswith("_accuracy")} for t in per_task.values()])
    return {**means, "k_values": list(ks), "ctx_len": ctx_len, "seed": seed, "tasks": per_task}
