"""Strategies for spending inference-time compute: one module each, declaring and registering its
StrategySpec (registry.py), and `run_strategy`, the entry point that streams their events and ends with
Done(usage). Importing this package imports every module in it, so the registry is complete and a new
strategy is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from edge_adapt.strategies.adaptive import round_sizes, temperatures
from edge_adapt.strategies.base import EngineLike, Pool, Scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import Chosen, Pruned, RoundStarted, Scored, StrategyEvent
from edge_adapt.strategies.extract import exact_text, last_number, make_extractor
from edge_adapt.strategies.registry import STRATEGIES, StrategySpec, names, spec_of
from edge_adapt.strategies.run import RunPlan, plan_run, prompt_tokens, run_strategy
from edge_adapt.strategies.vote import tally


def samples_at_once(config: StrategyConfig) -> int:
    """The most samples a run of `config` holds at the same time (the engine needs one more for the prompt)."""
    return spec_of(config.strategy).samples_at_once(config)


__all__ = [
    "STRATEGIES", "StrategySpec", "names", "spec_of", "StrategyConfig", "run_strategy", "plan_run", "RunPlan",
    "prompt_tokens", "EngineLike", "Scorer", "Pool", "Chosen", "Pruned", "RoundStarted", "Scored", "StrategyEvent",
    "round_sizes", "temperatures", "samples_at_once", "tally", "last_number", "exact_text", "make_extractor",
]
