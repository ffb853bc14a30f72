"""Token sampling, vectorised in numpy over the rows of a batch.

Every row draws from its own random generator, so a sequence's output for a fixed seed does not depend
on how many other sequences are decoded beside it. Filters follow llama.cpp's order: repetition penalty,
top-k, temperature, top-p, min-p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_adapt.errors import UsageError

# Candidates are the tokens within this many temperature-scaled nats of the most likely one: anything
# further is less than e^-25 (about 1e-11) times as likely as the top token, far below what top-p or
# min-p could keep, and skipping it spares a partition of the whole vocabulary per row per step.
_TAIL_NATS = 25.0

# The one declaration of the sampling settings' ranges: SamplingParams, StrategyConfig, the pool configs and
# the CLI all check through `check_sampling`. Each entry: the rule, what it says when broken, the CLI flag.
SAMPLING_RULES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: greedy)", "--temp"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)", "--top-k"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]", "--top-p"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1)", "--min-p"),
    "repeat_penalty": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (1: off)", "--repeat-penalty"),
    "repeat_last_n": (lambda v: v >= 0, ">= 0", "--repeat-last-n"),
    "seed": (lambda v: v >= 0, ">= 0", "--seed"),
}


def check_sampling(**values: float) -> None:
    """Raise UsageError naming the first setting out of its range (the field and its CLI flag)."""
    for name, value in values.items():
        ok, rule, flag = SAMPLING_RULES[name]
        if not ok(value):
            raise UsageError(f"{name} ({flag}) must be {rule}, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its next token. temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    ignore_eos: bool = False  # for benchmarks: never end on an end-of-generation token
    # (token, bias) pairs added to the logits before sampling, the reported log-probabilities included (OpenAI's
    # logit_bias: a self-eval client biases both answer tokens alike to read their relative log-probabilities).
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                       repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n, seed=self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def log_normalizers(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) of each row of float32 logits, in float64.

    Row by row through one reused buffer: a row of a 49k vocabulary (192 KiB) stays in the core's cache through
    its max, subtract, exp and sum, where whole-batch operations stream every intermediate through memory and
    allocate it afresh (at 64 rows this takes a fifth less time; the results are the same bits)."""
    out = np.empty(len(logits))
    buf = np.empty(logits.shape[-1], dtype=np.float32)
    for i, row in enumerate(logits):
        m = row.max()
        np.subtract(row, m, out=buf)
        np.exp(buf, out=buf)
        out[i] = np.log(buf.sum(dtype=np.float64)) + m
    return out


def token_logprobs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log-softmax of each row evaluated at that row's token, without materialising the whole row."""
    return logits[np.arange(len(tokens)), tokens] - log_normalizers(logits)


def top_logprobs(row: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely tokens of one row of logits and their log-probabilities (unfiltered distribution, as
    `token_logprobs`), most likely first."""
    k = min(k, row.shape[-1])
    idx = np.argpartition(-row, k - 1)[:k]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    m = float(row.max())
    lse = float(np.log(np.exp(row - m, dtype=np.float64).sum())) + m
    return tuple((int(i), float(row[i]) - lse) for i in idx)


def _candidates(row: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """Indices of the top_k most likely tokens of a row (all tokens when top_k is 0), most likely first,
    leaving out the negligible tail (see _TAIL_NATS)."""
    if top_k:
        top = _top_k_by_blocks(row, top_k)
        if top is not None:
            return top[row[top] >= row[top[0]] - _TAIL_NATS * temperature]
    floor = row.max() - _TAIL_NATS * temperature
    idx = np.flatnonzero(row >= floor)
    if top_k and len(idx) > top_k:
        idx = idx[np.argpartition(-row[idx], top_k - 1)[:top_k]]
    return idx[np.argsort(-row[idx], kind="stable")]


# A small model spreads its logits thin: the tail's 25 nats held a median of 13,900 of the default model's 49,152
# tokens at temperature 0.8, and partitioning them took 160-180 us a row, most of a sampled step where the decode
# is fast. Cut the row into n blocks of _BLOCK tokens (block j: tokens j, j + n, j + 2n, ...): the top k tokens lie
# in the k blocks with the highest maxima (a token outside them is below k block maxima, so below k tokens), and a
# partition of those k blocks' tokens finds them (70 us a row at k = 40).
_BLOCK = 32


def _top_k_by_blocks(row: np.ndarray, k: int) -> np.ndarray | None:
    """The k largest entries' indices, largest first; None where this is no shortcut (a short row) or where
    values tie among them or with the k-th: the order among equal values is then the one a partition of the whole
    tail gives, and `_candidates` does that instead, so every pick stays what it was."""
    n = len(row) // _BLOCK
    if k >= n // 4:
        return None
    blocks = row[: n * _BLOCK].reshape(_BLOCK, n)
    maxima = blocks.max(axis=0)
    ranked = np.argpartition(-maxima, k)
    best = ranked[:k]
    vals = np.concatenate([blocks[:, best].ravel(), row[n * _BLOCK :]])  # and the last, partial block
    top = np.argpartition(-vals, k - 1)[:k]
    top = top[np.argsort(-vals[top], kind="stable")]
    v = vals[top]
    if not (v[:-1] > v[1:]).all() or v[-1] <= maxima[ranked[k]] or np.count_nonzero(vals >= v[-1]) != k:
        return None
    in_blocks = top < _BLOCK * k
    member, block = np.divmod(top, k)
    return np.where(in_blocks, member * n + best[block], n * _BLOCK + top - _BLOCK * k)


def apply_repeat_penalty(logits: np.ndarray, recent: list[np.ndarray], penalties: np.ndarray) -> None:
    """In place: divide positive / multiply negative logits of recently seen tokens, once per distinct token."""
    for row, (toks, pen) in enumerate(zip(recent, penalties)):
        if pen == 1.0 or len(toks) == 0:
            continue
        ids = np.unique(toks)
        vals = logits[row, ids]
        logits[row, ids] = np.where(vals > 0, vals / pen, vals * pen)


def sample_rows(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    recent: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Pick one token per row (their log-probabilities under the model's unfiltered distribution, the rows as
    given, are `token_logprobs(logits, tokens)`)."""
    logits = np.asarray(logits, dtype=np.float32)
    penalties = np.array([p.repeat_penalty for p in params])
    work = logits
    if recent is not None and (penalties != 1.0).any():
        work = logits.copy()  # a filter of the sampling: the caller's rows, its log-probabilities' input, stay
        apply_repeat_penalty(work, recent, penalties)
    tokens = work.argmax(axis=-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        cand = _candidates(work[row], p.top_k, p.temperature)
        probs = np.exp((work[row, cand] - work[row, cand[0]]) / p.temperature, dtype=np.float64)
        probs /= probs.sum()
        keep = (np.cumsum(probs) - probs < p.top_p) & (probs >= p.min_p * probs[0])  # the top token always stays
        cdf = np.cumsum(np.where(keep, probs, 0.0))
        u = rngs[row].random() * cdf[-1]
        tokens[row] = cand[min(int(np.searchsorted(cdf, u, side="right")), len(cand) - 1)]
    return tokens
