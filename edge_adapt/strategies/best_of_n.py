"""best-of-n: N samples generated side by side, each scored once at the end; the highest p_keep wins
(ties: higher mean log-probability, then the earlier sample)."""

from __future__ import annotations

from collections.abc import Iterator

from edge_adapt.engine.engine import Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import StrategyEvent
from edge_adapt.strategies.registry import StrategySpec, register


def best_of_n(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "best-of-n")
    with Pool(engine, root, config) as pool:
        yield from pool.start(config.budget, config.temperature)
        yield from engine.steps(pool.samples)
        yield from pool.score(scorer, pool.samples)
        yield pool.chosen(pool.best(pool.samples))


register(StrategySpec("best-of-n", best_of_n))
