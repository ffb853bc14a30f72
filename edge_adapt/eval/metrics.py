"""Calibration and uncertainty: AUROC, Brier score, expected calibration error, reliability bins, intervals.

All pure functions over plain sequences; no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half); None without both."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U with average ranks for ties: a value's rank is the middle of its run in sorted order.
    ordered = np.sort(s)
    ranks = (np.searchsorted(ordered, s, "left") + np.searchsorted(ordered, s, "right") + 1) / 2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def within_prompt_auroc(groups: Sequence[tuple[Sequence[float], Sequence[bool]]]) -> float | None:
    """Probability that a right reply scores above a wrong reply *to the same prompt* (ties count half), over all
    such pairs; None when no prompt has both.

    This is what choosing among one prompt's samples (best-of-N, pruning) depends on. The pooled `auroc` also
    credits a score for telling easy prompts (or task families) from hard ones, which picks nothing: on issue 21's
    mix, pooled 0.80 went with 0.69 within prompts."""
    wins = pairs = 0.0
    for scores, labels in groups:
        s, y = np.asarray(scores, float), np.asarray(labels, bool)
        right, wrong = s[y], s[~y]
        if len(right) and len(wrong):
            diff = right[:, None] - wrong[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else None


def auroc_ci(groups: Sequence[tuple[Sequence[float], Sequence[bool]]], n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of AUROC, resampling whole groups (prompts), not single replies.

    The replies to one prompt share its difficulty, so they are not independent draws: resampling replies would
    give an interval far too narrow for a per-level AUROC over 40 prompts. None when no resample has both classes.
    """
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    scores = [np.asarray(g[0], float) for g in groups]
    labels = [np.asarray(g[1], bool) for g in groups]
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), size=len(groups))
        v = auroc(np.concatenate([scores[i] for i in pick]), np.concatenate([labels[i] for i in pick]))
        if v is not None:
            values.append(v)
    if not values:
        return None
    a = (1 - level) / 2
    return (float(np.quantile(values, a)), float(np.quantile(values, 1 - a)))


def brier(scores: Sequence[float], labels: Sequence[bool]) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    return float(np.mean((s - y) ** 2))


def brier_constant(labels: Sequence[bool]) -> float:
    """Brier score of always predicting the base rate: the bar a useful score has to get under."""
    y = np.asarray(labels, float)
    return float(y.mean() * (1 - y.mean()))


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    mean_score: float
    accuracy: float


def reliability_bins(scores: Sequence[float], labels: Sequence[bool], n_bins: int = 10) -> list[Bin]:
    """Equal-width bins over [0, 1]; a score of exactly 1 falls in the last bin. Empty bins are left out."""
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    idx = np.minimum((s * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            out.append(Bin(b / n_bins, (b + 1) / n_bins, int(m.sum()), float(s[m].mean()), float(y[m].mean())))
    return out


def ece(scores: Sequence[float], labels: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (share of samples) x |accuracy - mean score|."""
    n = len(scores)
    return float(sum(b.count / n * abs(b.accuracy - b.mean_score) for b in reliability_bins(scores, labels, n_bins)))


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def bootstrap_ci(per_prompt: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over prompts of the mean of per-prompt values (expected correctness in [0, 1])."""
    x = np.asarray(per_prompt, float)
    if len(x) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))
