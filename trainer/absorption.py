"""Feature absorption on the first-letter task, as SAEBench (sae-bench 0.6.0, `absorption`) defines it.

Task. Words are the tokenizer's single tokens that are ASCII letters, optionally after one leading
space (`n_words` of them drawn with the seed), split 80/20 into train and test words. A word's
prompt is `icl_examples` other words of its own split answered in the template, then the word
itself: "\\n{ex} has the first letter: {EX[0]}\\n...\\n{word} has the first letter:". The activation
is read at the SAE's site on the word's token (SAEBench reads resid_post at the word's position,
-6 for its tokenizers; here the prompt's pieces are tokenised apart, so the word is one token at a
known position whatever the tokenizer does to the text around it).

1. A 26-way one-vs-rest linear probe on the train words' activations: binary cross-entropy with
   pos_weight = negatives / positives per letter, Adam (lr 1e-2 decaying exponentially to 1e-5 over
   50 epochs, weight decay 1e-4), batches of 4,096. Its F1 per letter on the test words (score > 0).
2. k-sparse probes on the SAE's codes: the same 26-way probe with an L1 term 0.01 * mean over
   letters of sum |w| (weight decay 1e-6); for each letter and k = 1..max_k, the k latents of
   largest weight, and a class-balanced logistic regression (scikit-learn, max_iter 500) on them;
   F1 on the test words. A letter's main latents: k grows while F1 rises by more than 0.03.
3. For each letter, the test words of that letter the probe gets right (score > 0), each in a new
   prompt whose examples come from all the words; with a = the activation, d = the probe's unit
   weight vector, f = the codes and c_i = cos(d, W_dec,i): p_i = f_i c_i, P = a . d, M = sum p_i
   over the main latents; absorbers: the other latents with c_i >= 0.1 and p_i > 0, their top 3
   summing to T. Absorption fraction: 0 if M >= P or T / P < 0.4, else 1 if M <= 0, else
   min(T, P - M) / (min(T, P - M) + M). Full absorption: no main latent fires (f < 1e-8), the latent
   of largest p_i has c >= 0.025, P >= 0, and that p_i / P >= 0.4.
4. Per letter: the mean absorption fraction and the full-absorption rate over those words; the
   card's numbers are means over letters whose probe F1 exceeds 0.6, reported only when at least
   `min_letters` (SAEBench: 20) letters do. Otherwise the card says the model cannot do the task,
   with the probe's F1 per letter and its 26-way accuracy.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from store.errors import AtlasError

LETTERS = string.ascii_lowercase
TEMPLATE_SUFFIX = " has the first letter:"


@dataclass
class AbsorptionConfig:
    """Settings of the absorption measure (SAEBench's defaults where it has them)."""

    n_words: int = 1500
    """Words drawn from the tokenizer's alphabetic tokens (SAEBench takes all of them)."""
    icl_examples: int = 10
    """Answered examples before the word in each prompt."""
    max_k: int = 10
    """Largest k of the k-sparse probes."""
    f1_jump: float = 0.03
    """F1 gain that makes one more latent a main (split) latent."""
    min_probe_f1: float = 0.6
    """A letter counts when the probe's test F1 exceeds this."""
    min_letters: int = 20
    """Letters that must count for a rate to be reported."""
    batch_size: int = 16
    """Prompts per LM forward pass."""
    seed: int = 0
    """Seed of the word sample, the split, the prompts and the probes."""


def alpha_words(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of every token that is ASCII letters, optionally after one leading space."""
    out = []
    for tok, i in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([tok])
        word = text.removeprefix(" ")
        if word and all(ch in string.ascii_letters for ch in word):
            out.append((int(i), text))
    return sorted(out)


def split_words(vocab: list[tuple[int, str]], n_words: int, icl_examples: int, rng: random.Random) -> dict:
    """{"train": words, "test": words}: n_words drawn from vocab, 80 % train and 20 % test, disjoint."""
    if len(vocab) < max(10, 5 * (icl_examples + 1)):
        raise AtlasError(f"the tokenizer has only {len(vocab)} alphabetic tokens", "absorption needs a word vocabulary")
    words = rng.sample(vocab, min(n_words, len(vocab)))
    cut = int(0.8 * len(words))
    return {"train": words[:cut], "test": words[cut:]}


def first_letter(text: str) -> int:
    return LETTERS.index(text.strip()[0].lower())


def prompt_ids(tokenizer, bos: int, word: tuple[int, str], examples: list[tuple[int, str]]) -> list[int]:
    """BOS, the answered examples, then the word's token and the suffix (module docstring)."""
    prefix = "".join(f"\n{t}{TEMPLATE_SUFFIX} {t.strip()[0].upper()}" for _, t in examples) + "\n"
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    return [bos] + enc(prefix) + [word[0]] + enc(TEMPLATE_SUFFIX)


@torch.no_grad()
def word_activations(lm, site: str, prompts: list[list[int]], word_pos_from_end: int, batch_size: int) -> torch.Tensor:
    """[N, D] float32: the site's activation at each prompt's word token."""
    st = lm.site(site)
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), lm.separator_token_id, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, :len(p)] = torch.tensor(p)
        a = lm.read(ids, [st])[st.name].float().cpu()
        pos = torch.tensor([len(p) - word_pos_from_end for p in batch])
        out.append(a[torch.arange(len(batch)), pos])
    return torch.cat(out)


def train_multi_probe(x: torch.Tensor, y: torch.Tensor, l1: float = 0.0, weight_decay: float = 1e-4, epochs: int = 50,
                      lr: float = 1e-2, end_lr: float = 1e-5, batch_size: int = 4096, seed: int = 0) -> torch.nn.Linear:
    """One-vs-rest logistic probes (one output per column of the one-hot y), SAEBench's recipe."""
    torch.manual_seed(seed)
    x, y = x.float(), y.float()
    probe = torch.nn.Linear(x.shape[1], y.shape[1])
    pos = y.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(len(y) - pos) / pos.clamp(min=1))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(batch_size):
                opt.zero_grad()
                loss = loss_fn(probe(x[idx]), y[idx])
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return probe.eval().requires_grad_(False)


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0.0))


def k_sparse_probes(codes_tr: np.ndarray, y_tr: np.ndarray, codes_te: np.ndarray, y_te: np.ndarray, max_k: int,
                    seed: int = 0) -> dict[int, list[tuple[list[int], float]]]:
    """{letter: [(latents, test F1) for k = 1..max_k]}."""
    from sklearn.linear_model import LogisticRegression

    onehot = torch.nn.functional.one_hot(torch.from_numpy(y_tr), 26)
    l1_probe = train_multi_probe(torch.from_numpy(codes_tr), onehot, l1=0.01, weight_decay=1e-6, seed=seed)
    out = {}
    for letter in range(26):
        if not (y_tr == letter).any():
            continue
        rows = []
        for k in range(1, max_k + 1):
            feats = l1_probe.weight[letter].topk(k).indices.tolist()
            lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(codes_tr[:, feats], y_tr == letter)
            score = codes_te[:, feats] @ lr.coef_[0] + lr.intercept_[0]
            rows.append((feats, f1(y_te == letter, score > 0)))
        out[letter] = rows
    return out


def main_latents(rows: list[tuple[list[int], float]], jump: float) -> list[int]:
    """The latents of the largest k reached while each step raises F1 by more than `jump`."""
    best, chosen = -100.0, []
    for feats, score in rows:
        if score > best + jump:
            best, chosen = score, feats
        else:
            break
    return chosen


def absorption_of_word(act: torch.Tensor, codes: torch.Tensor, direction: torch.Tensor, w_dec: torch.Tensor,
                       main: list[int]) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one word (module docstring, step 3)."""
    d = direction / direction.norm()
    cos = torch.nn.functional.cosine_similarity(d[None, :], w_dec, dim=-1)
    p = codes * cos
    big_p = float(act @ d)
    m = float(p[main].sum())
    others = torch.ones_like(p, dtype=torch.bool)
    others[main] = False
    cand = p[others & (cos >= 0.1) & (p > 0)]
    t = float(cand.topk(min(3, cand.numel())).values.sum())
    if m >= big_p or t / big_p < 0.4:
        frac = 0.0
    elif m <= 0:
        frac = 1.0
    else:
        a = min(t, big_p - m)
        frac = float(np.clip(a / (a + m), 0.0, 1.0))
    top = int(p.argmax())
    full = bool((codes[main] < 1e-8).all() and cos[top] >= 0.025 and big_p >= 0 and float(p[top]) / big_p >= 0.4)
    return frac, full


def absorption(lm, site: str, encode, w_dec: torch.Tensor, cfg: AbsorptionConfig, keep: dict | None = None) -> dict:
    """The absorption part of a report card (module docstring). w_dec: [d_sae, D] decoder rows;
    `keep`, when given, receives the arrays measured (for the conformance script)."""
    if cfg.n_words < 10 or cfg.icl_examples < 1 or cfg.max_k < 1:
        raise AtlasError("absorption needs --absorption-words >= 10, at least one example and max_k >= 1")
    rng = random.Random(cfg.seed)
    vocab = alpha_words(lm.tokenizer)
    splits = split_words(vocab, cfg.n_words, cfg.icl_examples, rng)
    tail = len(lm.tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"]) + 1
    bos = lm.bos_token_id

    def prompts(ws, pool):  # examples drawn from pool, never the word itself
        return [prompt_ids(lm.tokenizer, bos, w, [p for p in rng.sample(pool, cfg.icl_examples + 1) if p != w]
                           [:cfg.icl_examples]) for w in ws]

    acts = {s: word_activations(lm, site, prompts(ws, ws), tail, cfg.batch_size) for s, ws in splits.items()}
    y = {s: np.array([first_letter(t) for _, t in ws]) for s, ws in splits.items()}
    if keep is not None:
        keep.update(test_words=[t for _, t in splits["test"]], train_words=[t for _, t in splits["train"]])
    def fresh():  # every test word once more, in a prompt whose examples come from the whole
        # vocabulary (only measured when the probe is good enough for a rate to be reported)
        return word_activations(lm, site, prompts(splits["test"], vocab), tail, cfg.batch_size)

    return absorption_from_activations(acts, y, fresh, encode, w_dec, cfg, keep)


def absorption_from_activations(acts: dict[str, torch.Tensor], y: dict[str, np.ndarray],
                                fresh: torch.Tensor | Callable[[], torch.Tensor], encode, w_dec: torch.Tensor,
                                cfg: AbsorptionConfig, keep: dict | None = None) -> dict:
    """Steps 1-4 of the module docstring from the words' activations: acts/y {"train", "test"} (the
    activations at each word in its own split's prompt, and its letter), `fresh` the test words'
    activations in their second prompt (or a function that measures them). cfg.seed seeds the
    probes' initial weights and shuffles (torch's global RNG, as SAEBench's probes use it)."""
    probe = train_multi_probe(acts["train"], torch.nn.functional.one_hot(torch.from_numpy(y["train"]), 26), seed=cfg.seed)
    scores = probe(acts["test"]).numpy()
    probe_f1 = {LETTERS[i]: f1(y["test"] == i, scores[:, i] > 0) for i in range(26)}
    good = [i for i in range(26) if probe_f1[LETTERS[i]] > cfg.min_probe_f1]
    out = {"probe_f1": probe_f1, "probe_accuracy": float((scores.argmax(1) == y["test"]).mean()),
           "letters_counted": [LETTERS[i] for i in good], "n_train_words": len(y["train"]),
           "n_test_words": len(y["test"]), "settings": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    if len(good) < cfg.min_letters:
        out.update(evaluated=False, reason=f"the probe reaches F1 > {cfg.min_probe_f1} on {len(good)} letters, "
                                           f"fewer than {cfg.min_letters}: the model cannot do the first-letter task here")
        return out
    codes = {s: encode(acts[s]).numpy() for s in acts}
    ks = k_sparse_probes(codes["train"], y["train"], codes["test"], y["test"], cfg.max_k, cfg.seed)
    direction = probe.weight.detach()
    fresh = fresh() if callable(fresh) else fresh
    fresh_codes = encode(fresh)
    if keep is not None:
        keep.update(train_acts=acts["train"].numpy(), test_acts=acts["test"].numpy(), y_train=y["train"],
                    y_test=y["test"], fresh_acts=fresh.numpy(), probe_weight=direction.numpy(),
                    probe_bias=probe.bias.detach().numpy())
    per_letter = {}
    for i in good:
        if i not in ks:  # no train word of that letter: no k-sparse probe
            continue
        main = main_latents(ks[i], cfg.f1_jump)
        tp = [j for j in range(len(y["test"])) if y["test"][j] == i and scores[j, i] > 0]
        if not tp:
            continue
        results = [absorption_of_word(fresh[j], fresh_codes[j], direction[i], w_dec, main) for j in tp]
        per_letter[LETTERS[i]] = {"main_latents": main, "probe_true_positives": len(tp),
                                  "mean_absorption_fraction": float(np.mean([r[0] for r in results])),
                                  "full_absorption_rate": float(np.mean([r[1] for r in results]))}
    rows = list(per_letter.values())
    if not rows:
        out.update(evaluated=False, reason="no letter has a test word the probe gets right")
        return out
    out.update(evaluated=True, per_letter=per_letter,
               mean_absorption_fraction=float(np.mean([r["mean_absorption_fraction"] for r in rows])),
               mean_full_absorption_rate=float(np.mean([r["full_absorption_rate"] for r in rows])),
               mean_num_split_latents=float(np.mean([len(r["main_latents"]) for r in rows])))
    return out
