"""adaptive: rounds of 1, 1, 2, 4, 8 ... samples until one reaches p_keep >= threshold or the budget is
spent; each round samples at the temperature the annealing schedule gives it. The best seen wins.
adaptive+prune: the same rounds, each generated with pruning at the prune points (see prune.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import RoundStarted, StrategyEvent
from edge_adapt.strategies.prune import check_prune_points, run_pruned
from edge_adapt.strategies.registry import PRUNING, ROUNDS, SCORED, StrategySpec, register


def round_sizes(budget: int) -> list[int]:
    """1, 1, 2, 4, 8 ... with the last round cut to what is left of the budget."""
    sizes: list[int] = []
    while sum(sizes) < budget:
        n = 1 if len(sizes) < 2 else 2 * sizes[-1]
        sizes.append(min(n, budget - sum(sizes)))
    return sizes


def temperatures(schedule: str, n_rounds: int, t_min: float, t_max: float, constant: float) -> list[float]:
    """The temperature of each round: constant, or rising from t_min (first round) to t_max (last round)
    linearly or geometrically."""
    if schedule == "constant":
        return [constant] * n_rounds
    if n_rounds == 1:
        return [t_min]
    frac = [r / (n_rounds - 1) for r in range(n_rounds)]
    if schedule == "linear":
        return [t_min + (t_max - t_min) * f for f in frac]
    if schedule == "exponential":
        return [t_min * math.exp(math.log(t_max / t_min) * f) for f in frac]
    raise ValueError(f"unknown schedule {schedule!r}")


def adaptive(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    return _rounds(engine, root, config, require_scorer(scorer, config.strategy), pruning=False)


def adaptive_prune(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    return _rounds(engine, root, config, require_scorer(scorer, config.strategy), pruning=True)


def _rounds(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer, *, pruning: bool
) -> Iterator[Event | StrategyEvent]:
    sizes = round_sizes(config.budget)
    temps = temperatures(config.schedule, len(sizes), config.t_min, config.t_max, config.temperature)
    candidates: list[Sample] = []
    with Pool(engine, root, config) as pool:
        for r, (n, t) in enumerate(zip(sizes, temps)):
            yield RoundStarted(r, n, t)
            yield from pool.start(n, t)
            new = pool.samples[-n:]
            if pruning:
                done = yield from run_pruned(
                    engine, pool, new, scorer, config.prune_at, config.keep_k, config.prune_threshold
                )
            else:
                yield from engine.steps(new)
                yield from pool.score(scorer, new)
                done = new
            pool.release(done)  # their text and scores stay; the sequence ids serve the next round
            candidates.extend(done)
            if any(pool.scores[s.index] >= config.threshold for s in done):
                break
        yield pool.chosen(pool.best(candidates))


def _largest_round(config: StrategyConfig) -> int:
    return max(round_sizes(config.budget))  # a round's sequences are given back before the next one starts


register(StrategySpec("adaptive", adaptive, samples_at_once=_largest_round, reads=SCORED | ROUNDS))
register(StrategySpec("adaptive+prune", adaptive_prune, samples_at_once=_largest_round, check=check_prune_points,
                      reads=SCORED | ROUNDS | PRUNING, unpruned="adaptive"))
