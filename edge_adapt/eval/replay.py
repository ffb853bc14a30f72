"""Strategies replayed over a recorded pool: pure functions, no generation.

Semantics (chosen to match the live strategies; each function's docstring says what it assumes):
- The K samples of a prompt are i.i.d. draws at one temperature, so a strategy that uses N of them is replayed
  as the *expectation over random subsets / orders* of the pool (exact where a formula exists, else an average
  over seeded random orders). Greedy is the separate temperature-0 sample.
- A strategy returns, per prompt, its expected correctness in [0, 1] and its expected compute: samples
  started, generated tokens, self-eval tokens. Accuracy intervals bootstrap over prompts.
- The live adaptive strategy anneals the temperature per round from near 0; the pool holds greedy plus one
  temperature, so replayed adaptive starts from a sample or from the greedy one and uses the pool's temperature
  after that. Nothing here measures what that approximation costs: `--live` (edge_adapt.eval.live.run_live) runs
  the replay's own semantics for real (greedy first, then the pool's temperature, the replayed threshold: the
  pool's median end score unless given) on fresh seeds, so it checks the replay's arithmetic and sampling
  noise, not the annealed strategy.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_adapt.eval.metrics import bootstrap_ci
from edge_adapt.eval.pool import PoolSample, PromptPool
from edge_adapt.strategies.adaptive import round_sizes


@dataclass(frozen=True)
class Replay:
    """One strategy at one setting, replayed over a pool. Lists are per prompt, in pool order."""

    strategy: str  # family: greedy, best-of-n, majority-vote, weighted-vote, adaptive, prune
    setting: str  # e.g. "by=self-eval N=8"
    correct: tuple[float, ...]
    samples: tuple[float, ...]
    tokens: tuple[float, ...]
    selfeval_tokens: tuple[float, ...]
    n_budget: int = 0  # K-equivalent budget for the curves: N for best-of-N, max samples for adaptive

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0

    def ci(self, seed: int = 0) -> tuple[float, float]:
        return bootstrap_ci(self.correct, seed=seed)

    @property
    def mean_samples(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0

    @property
    def mean_tokens(self) -> float:
        return float(np.mean(self.tokens)) if self.tokens else 0.0

    @property
    def mean_selfeval_tokens(self) -> float:
        return float(np.mean(self.selfeval_tokens)) if self.selfeval_tokens else 0.0

    def subset(self, idx: Sequence[int]) -> Replay:
        pick = lambda xs: tuple(xs[i] for i in idx)  # noqa: E731
        return Replay(self.strategy, self.setting, pick(self.correct), pick(self.samples), pick(self.tokens),
                      pick(self.selfeval_tokens), self.n_budget)


def _end_cost(s: PoolSample) -> float:
    return s.selfeval_tokens[-1]


def _rank_key(s: PoolSample, by: str) -> tuple[float, ...]:
    """Larger is better. Self-eval: end score, ties by mean log-prob. Log-prob: mean log-prob."""
    if by == "self-eval":
        return (s.end_score, s.mean_logprob)
    if by == "logprob":
        return (s.mean_logprob,)
    raise ValueError(f"unknown ranking {by!r}")


def _rank_probs(k: int, n: int) -> np.ndarray:
    """P(the best of a uniform random n-subset of k ranked items is the item at rank r), r = 0 (best) .. k-1."""
    total = math.comb(k, n)
    return np.array([math.comb(k - 1 - r, n - 1) / total for r in range(k)])


def greedy(pools: Sequence[PromptPool]) -> Replay:
    """The recorded temperature-0 sample: one sample, scored at the end (the score is not used)."""
    g = [p.greedy for p in pools]
    return Replay("greedy", "T=0", tuple(float(s.correct) for s in g), tuple(1.0 for _ in g),
                  tuple(float(s.n_tokens) for s in g), tuple(0.0 for _ in g), 1)


def best_of_n(pools: Sequence[PromptPool], n: int, by: str = "self-eval") -> Replay:
    """Generate N samples, keep the one ranked best (`by`: self-eval end score with ties by mean log-prob,
    mean log-prob, or oracle = any of the N is correct). Exact expectation over uniform N-subsets of the pool:
    the chosen sample is rank r of the pool with probability C(K-1-r, N-1) / C(K, N). Self-eval tokens count
    only when ranking by self-eval (N end scores)."""
    correct, samples, tokens, se = [], [], [], []
    for p in pools:
        k = len(p.samples)
        if not 1 <= n <= k:
            raise ValueError(f"best-of-{n} needs 1 <= N <= K={k}")
        if by == "oracle":
            c = sum(s.correct for s in p.samples)
            correct.append(1.0 - math.comb(k - c, n) / math.comb(k, n))
        else:
            ranked = sorted(p.samples, key=lambda s: _rank_key(s, by), reverse=True)
            correct.append(float(np.dot(_rank_probs(k, n), [s.correct for s in ranked])))
        samples.append(float(n))
        tokens.append(n * float(np.mean([s.n_tokens for s in p.samples])))
        se.append(n * float(np.mean([_end_cost(s) for s in p.samples])) if by == "self-eval" else 0.0)
    return Replay("best-of-n", f"by={by} N={n}", tuple(correct), tuple(samples), tuple(tokens), tuple(se), n)


def _vote(group: Sequence[PoolSample], weighted: bool) -> float:
    """Correctness of the winning answer (ties: the answer whose best sample has the highest end score)."""
    weight: dict[str | None, float] = defaultdict(float)
    best: dict[str | None, float] = defaultdict(lambda: -1.0)
    right: dict[str | None, list[bool]] = defaultdict(list)
    for s in group:
        weight[s.extracted] += s.end_score if weighted else 1.0
        best[s.extracted] = max(best[s.extracted], s.end_score)
        right[s.extracted].append(s.correct)
    # Replies with no extractable answer never win unless nothing else was said.
    cands = [a for a in weight if a is not None] or list(weight)
    win = max(cands, key=lambda a: (weight[a], best[a]))
    return float(np.mean(right[win]))


def vote(pools: Sequence[PromptPool], n: int, weighted: bool = False, draws: int = 64, seed: int = 0) -> Replay:
    """Majority vote (or self-eval-weighted vote) over the extracted answers of N samples. Expectation over
    N-subsets: exact (all subsets) when there are at most `draws` of them, else `draws` seeded random subsets."""
    short = min((len(p.samples) for p in pools), default=n)
    if n > short:  # fewer samples than N would be another strategy's row under this one's name
        raise ValueError(f"vote N={n} needs {n} samples per prompt; a pool holds {short}")
    rng = np.random.default_rng(seed)
    correct, tokens, se = [], [], []
    for p in pools:
        k = len(p.samples)
        if math.comb(k, n) <= draws:
            subsets = [list(c) for c in itertools.combinations(range(k), n)]
        else:
            subsets = [rng.choice(k, n, replace=False).tolist() for _ in range(draws)]
        correct.append(float(np.mean([_vote([p.samples[i] for i in sub], weighted) for sub in subsets])))
        tokens.append(n * float(np.mean([s.n_tokens for s in p.samples])))
        se.append(n * float(np.mean([_end_cost(s) for s in p.samples])) if weighted else 0.0)
    name = "weighted-vote" if weighted else "majority-vote"
    return Replay(name, f"N={n}", tuple(correct), tuple(float(n) for _ in pools), tuple(tokens), tuple(se), n)


def _adaptive_once(order: Sequence[PoolSample], threshold: float, budget: int, by: str) -> tuple[float, int, int, float]:
    oracle = by == "oracle"
    used: list[PoolSample] = []
    for size in round_sizes(budget):
        used.extend(order[len(used) : len(used) + size])
        if any(s.correct if oracle else s.end_score >= threshold for s in used):
            break
    tokens = sum(s.n_tokens for s in used)
    if oracle:
        return float(any(s.correct for s in used)), len(used), tokens, 0.0
    best = max(used, key=lambda s: _rank_key(s, "self-eval"))
    return float(best.correct), len(used), tokens, sum(_end_cost(s) for s in used)


def adaptive(pools: Sequence[PromptPool], threshold: float, budget: int | None = None, draws: int = 64,
             seed: int = 0, greedy_first: bool = False, by: str = "self-eval") -> Replay:
    """Adaptive sampling (Manvi et al. 2024): rounds of 1, 1, 2, 4, 8, ... samples, each scored at its end; stop
    as soon as any sample so far has p_keep >= threshold or the budget is spent; answer with the best-scored
    sample. Replayed by consuming the pool in `draws` seeded random orders and averaging (the samples are
    i.i.d.; the live strategy's per-round temperature annealing is not reproduced, see the module docstring).
    `greedy_first`: the first round is the pool's greedy sample (the live strategy starts near temperature 0),
    the later rounds draw from the sampled ones; the budget counts the greedy sample.
    `by="oracle"`: a perfect judge in place of the score (stop at the first right sample and answer with it; no
    threshold, no self-eval tokens). Its accuracy is the most any stopping rule reaches at this budget; it
    never gives up on a prompt, so a score can spend fewer samples, but only by answering fewer right."""
    rng = np.random.default_rng(seed)
    correct, samples, tokens, se = [], [], [], []
    for p in pools:
        b = min(budget or len(p.samples), len(p.samples))
        lead = [p.greedy] if greedy_first else []
        runs = [_adaptive_once(lead + [p.samples[i] for i in rng.permutation(len(p.samples))], threshold, b, by)
                for _ in range(draws)]
        c, n, t, e = (float(np.mean(x)) for x in zip(*runs))
        correct.append(c), samples.append(n), tokens.append(t), se.append(e)
    bud = budget or (len(pools[0].samples) if pools else 0)
    first = " first=greedy" if greedy_first else ""
    stop = "by=oracle" if by == "oracle" else f"threshold={threshold:.3g}"
    return Replay("adaptive", f"{stop} max={bud}{first}", tuple(correct), tuple(samples),
                  tuple(tokens), tuple(se), bud)


def prune_schedule(n: int, n_points: int, keep: float = 0.5) -> tuple[int, ...]:
    """How many samples survive each prune point: multiply by `keep` each time, at least 1."""
    out, cur = [], n
    for _ in range(n_points):
        cur = max(1, int(round(cur * keep)))
        out.append(cur)
    return tuple(out)


def _prune_once(group: Sequence[PoolSample], points: Sequence[int], keeps: Sequence[int | None]) -> tuple[float, float, float]:
    live = list(group)
    tokens = 0.0
    se = 0.0
    final: set[int] = set()  # scored after they had finished: their text is final, never scored again
    for i, (point, keep) in enumerate(zip(points, keeps)):
        if keep is None:  # the pool scored here, this schedule does not prune here
            continue
        # As Pool.score: every sample still in the pool is scored here; one that had finished costs what its
        # end score cost (the same text), once.
        for s in live:
            if s.scores[i] is not None:
                se += s.selfeval_tokens[i]
            elif s.index not in final:
                se += _end_cost(s)
                final.add(s.index)
        ranked = sorted(live, key=lambda s: (s.score_at(i), s.mean_logprob), reverse=True)
        kept, dropped = ranked[:keep], ranked[keep:]
        tokens += sum(min(s.n_tokens, point) for s in dropped)
        live = kept
    tokens += sum(s.n_tokens for s in live)
    se += sum(_end_cost(s) for s in live if s.index not in final)
    best = max(live, key=lambda s: _rank_key(s, "self-eval"))
    return float(best.correct), tokens, se


def prune(pools: Sequence[PromptPool], points: Sequence[int], n: int, keeps: Sequence[int | None], draws: int = 64,
          seed: int = 0) -> Replay:
    """Start N samples; at each prune point keep the top keeps[i] (None: do not prune or score there) by the p_keep recorded there (a sample that had
    already finished competes with its end score); the survivors run to the end and the best end score answers.
    Tokens: full length for survivors, min(length, prune point) for the pruned. Self-eval tokens, as the live
    strategy spends them (strategies/prune.py, Pool.score): at each prune point every sample still in the pool is
    scored, a sample still generating at its cost recorded there, one that had already finished at its end score's
    cost, and only the first time (a finished text is never scored again); at the end the survivors not yet
    scored as finished are scored once more. Expectation over N-subsets: exact when N = K, else `draws` seeded
    random subsets."""
    short = min((len(p.samples) for p in pools), default=n)
    if n > short:  # fewer samples than N would be another strategy's row under this one's name
        raise ValueError(f"prune N={n} needs {n} samples per prompt; a pool holds {short}")
    rng = np.random.default_rng(seed)
    correct, tokens, se = [], [], []
    for p in pools:
        k = len(p.samples)
        subsets = [list(range(k))] if n >= k else [rng.choice(k, n, replace=False).tolist() for _ in range(draws)]
        runs = [_prune_once([p.samples[i] for i in sub], points, keeps) for sub in subsets]
        c, t, e = (float(np.mean(x)) for x in zip(*runs))
        correct.append(c), tokens.append(t), se.append(e)
    used = [(k, p) for k, p in zip(keeps, points) if k is not None]
    setting = f"N={n} keep={'/'.join(str(k) for k, _ in used)} at={'/'.join(str(p) for _, p in used)}"
    return Replay("prune", setting, tuple(correct), tuple(float(n) for _ in pools),
                  tuple(tokens), tuple(se), n)


def default_thresholds(pools: Sequence[PromptPool], greedy_first: bool = False) -> list[float]:
    """Fixed thresholds plus quantiles of the pool's end scores (so an ill-scaled score still traces a curve).
    From greedy, also the quartiles of the greedy answers' scores: they stop at the greedy answer on about 75%,
    50% and 25% of the prompts, the low-sample end of the curve (where the rest go on sampling decides how low)."""
    scores = [s.end_score for p in pools for s in p.samples]
    fixed = [0.5, 0.7, 0.9]
    quant = [float(np.quantile(scores, q)) for q in (0.25, 0.5, 0.75, 0.9, 0.97)] if scores else []
    if greedy_first and pools:
        quant += [float(np.quantile([p.greedy.end_score for p in pools], q)) for q in (0.25, 0.5, 0.75)]
    return sorted({round(x, 4) for x in fixed + quant})


def replay_all(pools: Sequence[PromptPool], prune_points: Sequence[int], seed: int = 0) -> list[Replay]:
    """The standard sweep: greedy; best-of-N (self-eval, log-prob, oracle) and votes for N = 1, 2, 4, ..., K;
    adaptive over a threshold sweep, from a sample and from greedy (budget K, and 2 and 4 from greedy), and from
    greedy with a perfect judge at budgets 2, 4 and K; pruning schedules starting from K, K/2, K/4 samples (at
    least 2; none when K is 1)."""
    if not pools:
        return []
    k = min(len(p.samples) for p in pools)
    ns = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= k} | {k})
    out = [greedy(pools)]
    for by in ("self-eval", "logprob", "oracle"):
        out += [best_of_n(pools, n, by) for n in ns]
    out += [vote(pools, n, weighted=False, seed=seed) for n in ns if n > 1]
    out += [vote(pools, n, weighted=True, seed=seed) for n in ns if n > 1]
    for first in (False, True):
        out += [adaptive(pools, t, k, seed=seed, greedy_first=first) for t in default_thresholds(pools, first)]
    # From greedy with a small budget too (`run --strategy adaptive --budget 2|4`): the low-sample end, where a
    # prompt the score keeps doubting cannot run on to K samples.
    for cap in (c for c in (2, 4) if c < k):
        out += [adaptive(pools, t, cap, seed=seed, greedy_first=True) for t in default_thresholds(pools, True)]
    # What a perfect judge would get at the same budgets: the ceiling the score's rows are read against.
    out += [adaptive(pools, 0.0, cap, seed=seed, greedy_first=True, by="oracle") for cap in sorted({2, 4, k}) if cap <= k]
    if prune_points and k >= 2:  # one sample per prompt leaves nothing to prune
        # Schedules start from K, K/2 and K/4 samples, never fewer than 2 (pruning 1 keeps it) nor more than K.
        for n in sorted({k, max(2, k // 2), max(2, k // 4)}, reverse=True):
            # Halving and quartering coincide for small N (2 -> 1 either way): each schedule once.
            for keeps in dict.fromkeys(prune_schedule(n, len(prune_points), keep) for keep in (0.5, 0.25)):
                out.append(prune(pools, prune_points, n, keeps, seed=seed))
        if len(prune_points) > 1:  # one cut at each point alone: K -> K/4 (the paper's "prune early" setting)
            for i in range(len(prune_points)):
                keeps = [None] * len(prune_points)
                keeps[i] = max(1, k // 4)
                out.append(prune(pools, prune_points, k, keeps, seed=seed))
    return out


def answer_counts(pool: PromptPool) -> Counter:
    return Counter(s.extracted for s in pool.samples)
