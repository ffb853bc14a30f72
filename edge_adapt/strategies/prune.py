"""prune: start N samples; at each prune point score every sample still in the pool and keep the top k
(or those with p_keep >= prune_threshold, at least the best one); only the kept ones go on."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence as Seq

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import StrategyEvent
from edge_adapt.strategies.registry import PRUNING, SCORED, StrategySpec, register


def select(pool: Pool, samples: Seq[Sample], k: int | None, threshold: float | None) -> list[Sample]:
    """The samples that survive a prune point, in their original order."""
    ranked = sorted(samples, key=pool.rank_key, reverse=True)
    if threshold is not None:
        ranked = [s for s in ranked if pool.scores[s.index] >= threshold] or ranked[:1]
    if k is not None:
        ranked = ranked[:k]
    keep = {s.index for s in ranked}
    return [s for s in samples if s.index in keep]


def run_pruned(
    engine: EngineLike,
    pool: Pool,
    samples: Seq[Sample],
    scorer: Scorer,
    points: Seq[int],
    k: int | None,
    threshold: float | None,
) -> Generator[Event | StrategyEvent, None, list[Sample]]:
    """Generate `samples` to the end with pruning at `points`; returns the survivors, all scored."""
    alive = list(samples)
    for point in points:
        yield from engine.steps(alive, until=point)
        yield from pool.score(scorer, alive)
        keep = select(pool, alive, k, threshold)
        kept = {s.index for s in keep}
        yield from pool.prune([s for s in alive if s.index not in kept])
        alive = keep
    yield from engine.steps(alive)
    yield from pool.score(scorer, alive)
    return alive


def prune(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "prune")
    with Pool(engine, root, config) as pool:
        yield from pool.start(config.budget, config.temperature)
        alive = yield from run_pruned(
            engine, pool, pool.samples, scorer, config.prune_at, config.keep_k, config.prune_threshold
        )
        yield pool.chosen(pool.best(alive))


def check_prune_points(config: StrategyConfig) -> None:
    pts = config.prune_at
    if not pts:
        raise ValueError("prune_at needs at least one token count")
    if any(p < 1 for p in pts) or list(pts) != sorted(set(pts)):
        raise ValueError(f"prune_at {list(pts)} must be increasing positive token counts")
    if pts[-1] >= config.max_tokens:
        raise ValueError(f"prune point {pts[-1]} is not below max_tokens ({config.max_tokens})")


register(StrategySpec("prune", prune, check=check_prune_points, reads=SCORED | PRUNING, unpruned="best-of-n"))
