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

from edge_adapt.errors import UsageError, is_number, is_whole

# Candidates are the tokens within this many temperature-scaled nats of the most likely one: anything
# further is less than e^-25 (about 1e-11) times as likely as the top token, far below what top-p or
# min-p could keep, and skipping it spares a partition of the whole vocabulary per row per step.
_TAIL_NATS = 25.0

# The one declaration of the sampling settings' ranges: SamplingParams, StrategyConfig, the pool configs and
# the CLI all check through `check_sampling`. Each entry: the rule, what it says when broken, the CLI flag.
SAMPLING_RULES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    # Bounded so that a row's scaled logits stay ordinary float32 numbers: below 1e-6 sampling is greedy anyway,
    # and above 100 every token within 2,500 nats of the top one is a candidate (near uniform).
    "temperature": (lambda v: math.isfinite(v) and (v == 0 or 1e-6 <= v <= 100),
                    "a finite number, 0 (greedy) or in [1e-6, 100]", "--temp"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)", "--top-k"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]", "--top-p"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1)", "--min-p"),
    "repeat_penalty": (lambda v: math.isfinite(v) and 0.01 <= v <= 100, "a finite number in [0.01, 100] (1: off)",
                       "--repeat-penalty"),
    "repeat_last_n": (lambda v: v >= 0, ">= 0", "--repeat-last-n"),
    "seed": (lambda v: v >= 0, ">= 0", "--seed"),
}


WHOLE_NUMBERS = frozenset({"top_k", "repeat_last_n", "seed"})

# A logit bias beyond this is no stronger (100, OpenAI's limit, already makes a token certain or never picked), and
# near float32's limit the biased logits, or a repetition penalty's or a low temperature's scaling of them, overflow
# to inf and every log-probability becomes NaN (1e39 did).
MAX_LOGIT_BIAS = 1e6


def check_sampling(**values: float) -> None:
    """Raise UsageError naming the first setting out of its range (the field and its CLI flag)."""
    for name, value in values.items():
        ok, rule, flag = SAMPLING_RULES[name]
        whole = name in WHOLE_NUMBERS
        if not (is_whole(value) if whole else is_number(value)):
            raise UsageError(f"{name} ({flag}) must be {'a whole number' if whole else 'a number'}, got {value!r:.40}")
        if not ok(value):
            raise UsageError(f"{name} ({flag}) must be {rule}, got {value}")


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string is one stop string (as in OpenAI's API), not its characters. Refused
    (UsageError): an empty one, which would end every reply at once, and one that is not valid Unicode (a lone
    surrogate: bytes that were not UTF-8), which no generated text could ever match."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise UsageError(f"stop is a string or a list of strings, got {type(stop).__name__}")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(x, str) and x for x in stops):
        raise UsageError(f"stop strings must be non-empty strings, got {stops!r:.80}")
    for x in stops:
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(f"stop string {x!r:.40} is not valid Unicode ({exc.object[exc.start:exc.end]!r} at "
                             f"character {exc.start})") from None
    return stops


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
        # A negative id would bias the vocabulary's last token (numpy indexing), a NaN bias every pick.
        try:
            bias = tuple((t, float(b)) for t, b in self.logit_bias)
        except (TypeError, ValueError):
            raise UsageError("logit_bias is a sequence of (token id, bias) pairs") from None
        for t, b in bias:
            if not is_whole(t) or t < 0:
                raise UsageError(f"logit_bias names token {t!r}: a token id is a whole number >= 0")
            if not math.isfinite(b):
                raise UsageError(f"logit_bias for token {t} must be a finite number, got {b}")
            if abs(b) > MAX_LOGIT_BIAS:
                raise UsageError(f"logit_bias for token {t} must be between {-MAX_LOGIT_BIAS:,.0f} and "
                                 f"{MAX_LOGIT_BIAS:,.0f}, got {b:g}")
        object.__setattr__(self, "logit_bias", tuple((int(t), b) for t, b in bias))
        # A numpy seed would wrap around in `seed + i` (generate's sample i), where a Python int does not.
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def check_bias_vocabulary(params: Sequence[SamplingParams], n_vocab: int) -> None:
    """Refuse a logit_bias naming a token past the vocabulary (known only with a model, not in SamplingParams)."""
    outside = next((t for p in params for t, _ in p.logit_bias if t >= n_vocab), None)
    if outside is not None:
        raise UsageError(f"logit_bias names token {outside}, outside the model's vocabulary of {n_vocab}")


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
    lse = float(log_normalizers(row[None, :])[0])  # as token_logprobs: the chosen token's two values are one
    return tuple((int(i), float(row[i]) - lse) for i in idx)


def _candidates(row: np.ndarray, top_k: int, temperature: float, top: np.ndarray | None) -> np.ndarray:
    """Indices of the top_k most likely tokens of a row (all tokens when top_k is 0), most likely first,
    leaving out the negligible tail (see _TAIL_NATS). `top`: the row's top_k as `_top_k_by_blocks` found them,
    or None where it did not (no top_k, ties, a short row): the whole tail is partitioned then."""
    if top is not None:
        return top[row[top] >= row[top[0]] - _TAIL_NATS * temperature]
    idx = np.flatnonzero(row >= row.max() - _TAIL_NATS * temperature)
    if top_k and len(idx) > top_k:
        idx = idx[np.argpartition(-row[idx], top_k - 1)[:top_k]]
    return idx[np.argsort(-row[idx], kind="stable")]


# A small model spreads its logits thin: the tail's 25 nats held a median of 13,900 of the default model's 49,152
# tokens at temperature 0.8, and partitioning them took 160-180 us a row, most of a sampled step where the decode
# is fast. Instead, the top k are narrowed down through maxima of nested groups of tokens, a few hundred values
# partitioned at each level: a row of n_vocab tokens is cut into sub-blocks of _SUB strided tokens, four of those
# make a block, four blocks a group. The top k tokens lie in the k sub-blocks with the highest maxima among the
# sub-blocks of the k blocks with the highest maxima, which lie among the blocks of the k + 1 groups with the
# highest maxima (a token outside them is below k others). Each numpy call does every row of a step at once.
_SUB = 8
_NEST = 4  # sub-blocks a block, blocks a group


def _top_k_by_blocks(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For each row of `rows` (m, n_vocab): the indices of its k largest entries, largest first, and whether they
    stand: not where values tie among them or with the k-th, as the order among equal values is then the one a
    partition of the whole tail gives (`_candidates` does that instead, so every pick stays what it was). None
    where rows are too short for this to gain anything."""
    m, width = rows.shape
    q, block = _NEST, _NEST * _SUB
    n = width // block  # blocks; sub-block s holds tokens s + c * q * n, block j the sub-blocks j + d * n
    groups = n // q  # group g holds the blocks g + e * groups; blocks past groups * q are candidates always
    if k >= groups:
        return None
    at = np.arange(m)[:, None]  # x[at, idx]: each row's own entries (np.take_along_axis costs ~7 us a call)
    sub_max = rows[:, : n * block].reshape(m, _SUB, q * n).max(axis=1)
    block_max = sub_max.reshape(m, q, n).max(axis=1)
    group_max = block_max[:, : groups * q].reshape(m, q, groups).max(axis=1)

    def best(values: np.ndarray, ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the `count` highest values of each row, and the next highest value (-inf if none)."""
        if values.shape[1] <= count:
            return ids, np.full(m, -np.inf, dtype=values.dtype)
        ranked = np.argpartition(-values, count, axis=1)
        return ids[at, ranked[:, :count]], values[at[:, 0], ranked[:, count]]

    top_groups, _ = best(group_max, np.broadcast_to(np.arange(groups), (m, groups)), k + 1)
    blocks = (top_groups[:, :, None] + np.arange(q) * groups).reshape(m, -1)
    if n > groups * q:
        blocks = np.concatenate([blocks, np.broadcast_to(np.arange(groups * q, n), (m, n - groups * q))], axis=1)
    top_blocks, next_block = best(block_max[at, blocks], blocks, k)
    subs = (top_blocks[:, :, None] + np.arange(q) * n).reshape(m, -1)
    top_subs, next_sub = best(sub_max[at, subs], subs, k)
    tokens = (top_subs[:, :, None] + np.arange(_SUB) * (q * n)).reshape(m, -1)
    if width > n * block:  # the tokens past the last whole block: candidates always
        tokens = np.concatenate([tokens, np.broadcast_to(np.arange(n * block, width), (m, width - n * block))], axis=1)
    vals = rows[at, tokens]
    top = np.argpartition(-vals, k - 1, axis=1)[:, :k]
    top_vals = vals[at, top]
    order = np.argsort(-top_vals, axis=1, kind="stable")
    top, v = top[at, order], top_vals[at, order]
    # No tie among the k, and every token left out below the k-th: those of the blocks and of the sub-blocks not
    # chosen are at most the highest maximum left out at that level, the others were partitioned here.
    last = v[:, -1]
    stand = ((v[:, :-1] > v[:, 1:]).all(axis=1) & (last > next_block) & (last > next_sub)
             & (np.count_nonzero(vals >= v[:, -1:], axis=1) == k))
    return tokens[at, top], stand


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
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled:
        return work.argmax(axis=-1)
    tokens = np.zeros(len(params), dtype=np.intp)  # an argmax of every row would be a pass over each sampled one too
    for row, p in enumerate(params):
        if p.greedy:
            tokens[row] = work[row].argmax()
    tops: dict[int, np.ndarray] = {}  # the top_k of each sampled row, found for all rows that share top_k at once
    for k in {params[row].top_k for row in sampled} - {0}:
        rows = [row for row in sampled if params[row].top_k == k]
        found = _top_k_by_blocks(work if len(rows) == len(work) else work[rows], k)
        if found is not None:
            tops.update((row, top) for row, top, stands in zip(rows, *found) if stands)
    # Rows whose top_k all lie within the tail (nearly all, at usual temperatures) have top_k candidates each, so
    # those that share top_k are drawn at once; the others one by one.
    together: dict[int, list[int]] = {}
    for row, top in tops.items():
        if work[row, top[-1]] >= work[row, top[0]] - _TAIL_NATS * params[row].temperature:
            together.setdefault(len(top), []).append(row)
    for rows in together.values():
        tokens[rows] = _draw(work, rows, np.stack([tops[row] for row in rows]), params, rngs)
    drawn = {row for rows in together.values() for row in rows}
    for row in sampled:
        if row not in drawn:
            cand = _candidates(work[row], params[row].top_k, params[row].temperature, tops.get(row))
            tokens[row] = _draw(work, [row], cand[None], params, rngs)[0]
    return tokens


def _draw(work: np.ndarray, rows: list[int], cand: np.ndarray, params: Sequence[SamplingParams],
          rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One token per row of `rows`, from its candidates (a row of `cand`, most likely first): temperature, then
    top-p and min-p (the top token always stays), then a draw from the row's generator. Row-wise numpy, so
    rows drawn together give the bits each gives alone."""
    at = np.array(rows)[:, None]
    vals = work[at, cand]
    temperature = np.array([params[r].temperature for r in rows], dtype=np.float32)[:, None]
    probs = np.exp((vals - vals[:, :1]) / temperature, dtype=np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    top_p = np.array([params[r].top_p for r in rows])[:, None]
    min_p = np.array([params[r].min_p for r in rows])[:, None]
    keep = (np.cumsum(probs, axis=1) - probs < top_p) & (probs >= min_p * probs[:, :1])
    cdf = np.cumsum(np.where(keep, probs, 0.0), axis=1)
    u = np.array([rngs[r].random() for r in rows])[:, None] * cdf[:, -1:]
    picked = np.minimum(np.count_nonzero(cdf <= u, axis=1), cand.shape[1] - 1)  # searchsorted(cdf, u, "right")
    return cand[np.arange(len(rows)), picked]
