"""Strategies for spending inference-time compute: one module each, a STRATEGIES registry, and
`run_strategy`, the entry point that streams their events and ends with Done(usage)."""

from edge_adapt.strategies.adaptive import round_sizes, temperatures
from edge_adapt.strategies.base import EngineLike, Pool, Scorer
from edge_adapt.strategies.config import STRATEGY_NAMES, StrategyConfig
from edge_adapt.strategies.events import Chosen, Pruned, RoundStarted, Scored, StrategyEvent
from edge_adapt.strategies.extract import exact_text, last_number, make_extractor
from edge_adapt.strategies.registry import NEEDS_SCORER, STRATEGIES, samples_at_once
from edge_adapt.strategies.run import prompt_tokens, run_strategy
from edge_adapt.strategies.vote import tally

__all__ = [
    "STRATEGIES", "STRATEGY_NAMES", "NEEDS_SCORER", "StrategyConfig", "run_strategy", "prompt_tokens",
    "EngineLike", "Scorer", "Pool", "Chosen", "Pruned", "RoundStarted", "Scored", "StrategyEvent",
    "round_sizes", "temperatures", "samples_at_once", "tally", "last_number", "exact_text", "make_extractor",
]
