"""Engines sized by the library from exact token counts and the strategies' declarations."""

from __future__ import annotations

import pytest

from edge_adapt.engine import Engine, EngineOptions, Vocab
from edge_adapt.errors import BudgetError
from edge_adapt.result import collect
from edge_adapt.selfeval import suffix_tokens
from edge_adapt.sizing import (
    CELLS, EngineSize, engine_for_strategy, ensure, for_generation, for_pool, for_strategy, load_engine, round_ctx,
)
from edge_adapt.strategies import StrategyConfig, run_strategy

PROMPT = "A shop sells pens at 3 dollars each. How much do 7 pens cost?"


def test_round_ctx_follows_llamas_cells():
    assert [round_ctx(n) for n in (1, 256, 257, 700)] == [CELLS, 256, 512, 768]


def test_strategy_size_counts_prompt_span_suffix_and_every_sequence():
    with Vocab() as vocab:
        prompt = vocab.tokenize(vocab.chat_prompt([{"role": "user", "content": PROMPT}]))
        suffix = len(suffix_tokens(vocab))
        size, plan = for_strategy(vocab, PROMPT, StrategyConfig(strategy="beam", budget=4, max_tokens=300))
        assert plan.prompt == prompt and plan.suffix == suffix == 3  # the shipped adapter's <|im_end|>Restart
        assert size == EngineSize(4 + 1 + 1, round_ctx(len(prompt) + 300 + suffix))  # beams + the parent + prompt
        revise, plan = for_strategy(vocab, PROMPT, StrategyConfig(strategy="revise", budget=8, max_tokens=50))
        assert plan.span > 4 * 50 and revise.sequences == plan.samples + 1 == 2 + 1
        assert for_strategy(vocab, PROMPT, StrategyConfig(strategy="single"), ctx=4096)[0].ctx == 4096
    assert for_generation(prompt, 3, 100) == EngineSize(3, round_ctx(len(prompt) + 100))
    assert for_pool(60, 16, 96, 3, extra=[EngineSize(9, 1024)]) == EngineSize(18, 1024)


def test_a_sized_engine_runs_its_strategy_with_nothing_to_spare():
    config = StrategyConfig(strategy="lookahead", budget=4, max_tokens=24, max_step_tokens=8)
    engine, plan = engine_for_strategy(PROMPT, config, EngineOptions(device="cpu"))
    with engine:
        assert engine.options.parallel == 2 * 4 + 1
        r = collect(run_strategy(engine, plan.prompt, plan.config))
        assert r.chosen is not None and engine.free_sequences == engine.options.parallel


def test_memory_budget_is_refused_before_loading():
    from edge_adapt.engine.budget import plan
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf

    # The plan counts this process's own memory, which differs between a test alone and the whole suite: the
    # budget is one sequence's plan and 10 MiB, never 64 sequences (about 22 MiB of KV each).
    one = plan(inspect_gguf(default_model_path()), parallel=1, ctx=1024).total
    with pytest.raises(BudgetError, match="64 parallel sequences"):
        load_engine(EngineSize(64, 1024), EngineOptions(device="cpu"), mem_budget=one + (10 << 20))


def test_ensure_grows_an_idle_engine_only_when_needed():
    with Engine(parallel=2, ctx=256, device="cpu") as e:
        ensure(e, EngineSize(2, 256))
        assert e.options.parallel == 2
        ensure(e, EngineSize(3, 600))
        assert e.options.parallel == 3 and e.n_ctx_seq >= 600
