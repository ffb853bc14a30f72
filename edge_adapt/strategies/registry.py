"""STRATEGIES: name -> strategy function (engine, root sequence, config, scorer) -> event iterator."""

from __future__ import annotations

from edge_adapt.strategies.adaptive import adaptive, adaptive_prune, round_sizes
from edge_adapt.strategies.base import StrategyFn
from edge_adapt.strategies.best_of_n import best_of_n
from edge_adapt.strategies.config import STRATEGY_NAMES, StrategyConfig
from edge_adapt.strategies.prune import prune
from edge_adapt.strategies.single import single
from edge_adapt.strategies.vote import vote, weighted_vote

STRATEGIES: dict[str, StrategyFn] = {
    "single": single,
    "best-of-n": best_of_n,
    "adaptive": adaptive,
    "prune": prune,
    "adaptive+prune": adaptive_prune,
    "vote": vote,
    "weighted-vote": weighted_vote,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES

# Strategies that cannot run without a self-evaluation scorer (single scores only when given one).
NEEDS_SCORER = frozenset({"best-of-n", "adaptive", "prune", "adaptive+prune", "weighted-vote"})


def samples_at_once(config: StrategyConfig) -> int:
    """The most samples a run holds at the same time (the engine needs one more sequence for the prompt)."""
    if config.strategy == "single":
        return 1
    if config.strategy in ("adaptive", "adaptive+prune"):
        return max(round_sizes(config.budget))
    return config.budget
