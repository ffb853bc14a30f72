"""Compute-optimal policy tuning (Snell et al. 2024): which strategy to run per difficulty bin and budget.

Difficulty is the probe's (the greedy sample's) self-eval score, cut into 5 bins at quantiles of the tuning
prompts' probe scores. Every candidate (the probe alone, best-of-N, weighted best-of-N, majority vote,
adaptive, pruning; each within the budget once the probe is paid) is replayed over the pools, giving per prompt
its correctness and tokens. Per bin the most accurate candidate wins; one within `tolerance` of it that
generates fewer tokens wins instead (a 2-point gain for double the tokens is not compute-optimal).

Two-fold cross-validation reports what the tuning is worth on prompts it did not see: each fold's bins and
choices come from the other fold only. The policy that is written is tuned on all the prompts given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_adapt.errors import UsageError
from edge_adapt.eval import replay as rp
from edge_adapt.eval.metrics import bootstrap_ci
from edge_adapt.eval.pool import PromptPool
from edge_adapt.strategies.policy import N_BINS, PROBE, Policy, PolicyChoice

DEFAULT_BUDGETS = (2, 4, 6, 8, 12, 16)
THRESHOLDS = (0.3, 0.5, 0.7)


def choice_key(c: PolicyChoice) -> str:
    return c.describe()


def candidates(budget: int, k: int, prune_points: Sequence[int], temperature: float) -> list[PolicyChoice]:
    """Every replayable way to spend `budget` samples, one of which is the probe: the probe alone, or up to
    budget - 1 more samples (at most the pool's K)."""
    rest = min(budget - 1, k)
    out = [PolicyChoice(strategy=PROBE)]
    if rest < 1:
        return out
    ns = sorted({n for n in (1, 2, 4, 8, 16, 32) if n <= rest} | {rest})
    out += [PolicyChoice(strategy="best-of-n", options={"budget": n, "temperature": temperature}) for n in ns]
    out += [PolicyChoice(strategy="weighted-best-of-n", options={"budget": n, "temperature": temperature}) for n in ns if n > 1]
    out += [PolicyChoice(strategy="vote", options={"budget": n, "temperature": temperature}) for n in ns if n > 2]
    if rest >= 2:
        out += [PolicyChoice(strategy="adaptive", options={"budget": rest, "threshold": t, "schedule": "constant",
                                                           "temperature": temperature}) for t in THRESHOLDS]
    if rest >= 4:
        out += [PolicyChoice(strategy="prune", options={"budget": rest, "k": max(1, rest // 4), "prune_at": [p],
                                                        "temperature": temperature}) for p in prune_points]
    return out


def replay_choice(choice: PolicyChoice, pools: Sequence[PromptPool], prune_points: Sequence[int], seed: int = 0) -> rp.Replay:
    """The choice replayed over the pools: extra correctness and compute *after* the probe (the probe's own
    cost is added by the caller, as every choice pays it)."""
    o = choice.options
    n = int(o.get("budget", 1))
    if choice.strategy == PROBE:
        g = rp.greedy(pools)
        zeros = tuple(0.0 for _ in pools)
        return rp.Replay(PROBE, "", g.correct, zeros, zeros, zeros, 0)
    if choice.strategy == "best-of-n":
        return rp.best_of_n(pools, n, "self-eval")
    if choice.strategy in ("weighted-best-of-n", "weighted-vote"):
        return rp.vote(pools, n, weighted=True, seed=seed)
    if choice.strategy == "vote":
        return rp.vote(pools, n, weighted=False, seed=seed)
    if choice.strategy == "adaptive":
        return rp.adaptive(pools, float(o["threshold"]), n, seed=seed)
    if choice.strategy == "prune":
        keeps = [int(o["k"]) if p in o["prune_at"] else None for p in prune_points]
        return rp.prune(pools, prune_points, n, keeps, seed=seed)
    raise UsageError(f"{choice.strategy} cannot be replayed from a pool; measure it with --live")


@dataclass(frozen=True)
class Table:
    """Per candidate and prompt: correctness and generated tokens, the probe's included."""

    choices: list[PolicyChoice]
    correct: np.ndarray  # (candidates, prompts)
    tokens: np.ndarray
    probe_scores: np.ndarray  # (prompts,)
    levels: list[int | None]


def build_table(pools: Sequence[PromptPool], budget: int, prune_points: Sequence[int], temperature: float,
                seed: int = 0) -> Table:
    k = min(len(p.samples) for p in pools)
    choices = candidates(budget, k, prune_points, temperature)
    probe_cost = np.array([p.greedy.n_tokens for p in pools], float)
    rows = [replay_choice(c, pools, prune_points, seed) for c in choices]
    return Table(choices, np.array([r.correct for r in rows]), np.array([r.tokens for r in rows]) + probe_cost,
                 np.array([p.greedy.end_score for p in pools]), [p.level for p in pools])


def bin_edges(probe_scores: Sequence[float]) -> list[float]:
    return [float(x) for x in np.quantile(np.asarray(probe_scores, float), [0.2, 0.4, 0.6, 0.8])]


def bins_of(scores: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    return np.array([N_BINS - sum(s >= e for e in edges) for s in scores])


def choose(table: Table, prompts: Sequence[int], bins: np.ndarray, tolerance: float) -> list[int]:
    """Per bin 1..5, the index of the chosen candidate on `prompts` (a bin without prompts: the probe)."""
    picks = []
    for b in range(1, N_BINS + 1):
        idx = [i for i in prompts if bins[i] == b]
        if not idx:
            picks.append(0)
            continue
        acc = table.correct[:, idx].mean(axis=1)
        tok = table.tokens[:, idx].mean(axis=1)
        good = np.flatnonzero(acc >= acc.max() - tolerance - 1e-12)
        picks.append(int(good[np.argmin(tok[good])]))
    return picks


def folds_of(levels: Sequence[int | None], n_folds: int, seed: int) -> list[list[int]]:
    """Prompts dealt into folds level by level (each fold gets its share of every level), seeded."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for lv in sorted({x if x is not None else -1 for x in levels}):
        idx = [i for i, x in enumerate(levels) if (x if x is not None else -1) == lv]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[j % n_folds].append(i)
    return [sorted(f) for f in folds]


@dataclass(frozen=True)
class CrossValidated:
    budget: int
    correct: np.ndarray  # per prompt, each scored by the choice made on the other fold
    tokens: np.ndarray
    bins: np.ndarray  # per prompt, by the other fold's edges
    picks: list[list[str]]  # per fold: the choice per bin made on the other fold

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean())

    def ci(self, seed: int = 0) -> tuple[float, float]:
        return bootstrap_ci(self.correct.tolist(), seed=seed)


def cross_validate(table: Table, budget: int, tolerance: float, n_folds: int = 2, seed: int = 0) -> CrossValidated:
    folds = folds_of(table.levels, n_folds, seed)
    n = table.correct.shape[1]
    correct, tokens, bins = np.zeros(n), np.zeros(n), np.zeros(n, int)
    picks = []
    for f, held_out in enumerate(folds):
        train = [i for g, fold in enumerate(folds) if g != f for i in fold]
        edges = bin_edges(table.probe_scores[train])
        b = bins_of(table.probe_scores, edges)
        chosen = choose(table, train, b, tolerance)
        picks.append([choice_key(table.choices[c]) for c in chosen])
        for i in held_out:
            c = chosen[b[i] - 1]
            correct[i], tokens[i], bins[i] = table.correct[c, i], table.tokens[c, i], b[i]
    return CrossValidated(budget, correct, tokens, bins, picks)


def tune(pools: Sequence[PromptPool], *, model: str, self_eval: str, prune_points: Sequence[int],
         temperature: float, budgets: Sequence[int] = DEFAULT_BUDGETS, tolerance: float = 0.02,
         seed: int = 0, source: str = "") -> tuple[Policy, dict[int, Table]]:
    """The policy chosen on all `pools`, and each budget's candidate table (for reports)."""
    if len(pools) < 2 * N_BINS:
        raise UsageError(f"tuning needs at least {2 * N_BINS} prompts, got {len(pools)}")
    if any(b < 1 for b in budgets):
        raise UsageError("budgets must be at least 1")
    tables = {b: build_table(pools, b, prune_points, temperature, seed) for b in sorted(set(budgets))}
    scores = next(iter(tables.values())).probe_scores
    edges = bin_edges(scores)
    bins = bins_of(scores, edges)
    rows: dict[int, list[PolicyChoice]] = {}
    everyone = list(range(len(pools)))
    for b, t in tables.items():
        row = []
        for bin_, c in enumerate(choose(t, everyone, bins, tolerance), start=1):
            idx = [i for i in everyone if bins[i] == bin_]
            row.append(t.choices[c].model_copy(update={
                "accuracy": round(float(t.correct[c, idx].mean()), 4) if idx else None,
                "tokens": round(float(t.tokens[c, idx].mean()), 1) if idx else None, "prompts": len(idx)}))
        rows[b] = row
    policy = Policy(model=model, self_eval=self_eval, probe_temperature=0.0, bin_edges=edges, budgets=rows,
                    tuning={"source": source, "prompts": len(pools), "tolerance": tolerance, "seed": seed,
                            "prune_points": list(prune_points), "temperature": temperature})
    return policy, tables


@dataclass(frozen=True)
class Applied:
    """A policy replayed per prompt: correctness, generated tokens and self-eval tokens (probe included)."""

    correct: np.ndarray
    tokens: np.ndarray
    selfeval_tokens: np.ndarray
    bins: np.ndarray


def apply(policy: Policy, pools: Sequence[PromptPool], budget: int, prune_points: Sequence[int],
          seed: int = 0) -> Applied:
    """The policy replayed on pools it was not tuned on."""
    _, row = policy.row_for(budget)
    bins = np.array([policy.bin_of(p.greedy.end_score) for p in pools])
    correct, tokens = np.zeros(len(pools)), np.zeros(len(pools))
    se = np.array([p.greedy.selfeval_tokens[-1] for p in pools], float)  # scoring the probe
    tokens = np.array([p.greedy.n_tokens for p in pools], float)
    for b in range(1, N_BINS + 1):
        idx = [i for i in range(len(pools)) if bins[i] == b]
        if not idx:
            continue
        r = replay_choice(row[b - 1], [pools[i] for i in idx], prune_points, seed)
        correct[idx] = r.correct
        tokens[idx] += np.asarray(r.tokens)
        se[idx] += np.asarray(r.selfeval_tokens)
    return Applied(correct, tokens, se, bins)
