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


def test_plans_stop_at_the_sequences_one_context_holds_and_say_so_whatever_the_memory():
    """Was: fit searched up to 257 sequences and planned 256, which the engine refuses (llama.cpp has 256 sequence
    ids and split KV keeps one spare); 300 within 100 GB blamed the memory, and plan() took 300 as it was."""
    from edge_adapt.engine.budget import fit, plan
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.engine.handles import MAX_SEQUENCE_IDS

    info, plenty = inspect_gguf(default_model_path()), 100 << 30
    most = fit(info, plenty, ctx=1024, runtime=0).parallel
    assert most == MAX_SEQUENCE_IDS - 1
    Engine._sequence_ids(EngineOptions(parallel=most))  # the engine takes what was planned
    assert fit(info, plenty, ctx=1024, kv_unified=True, runtime=0).parallel == MAX_SEQUENCE_IDS  # no spare id
    for refused in (lambda: fit(info, plenty, ctx=1024, want=300, runtime=0),
                    lambda: plan(info, parallel=300, ctx=1024, runtime=0)):
        with pytest.raises(BudgetError, match=f"300 parallel sequences are more than one llama.cpp context holds: "
                                              f"at most {MAX_SEQUENCE_IDS - 1}") as exc:
            refused()
        assert "mem-budget" not in str(exc.value)
        # the unified KV is named as what it is, a library setting (was "or unify the KV", which no command offers)
        assert str(exc.value).endswith(f"hold at most {MAX_SEQUENCE_IDS - 1}; a library engine with a unified KV, "
                                       f"EngineOptions(kv_unified=True), holds {MAX_SEQUENCE_IDS})")


def test_a_program_sized_context_past_the_models_training_names_what_needs_it_not_ctx(tmp_path):
    """Was: eval on a suite with one very long prompt said `--ctx 9472 exceeds the model's training context`, a
    flag eval, label and tune-policy do not have."""
    import json

    from edge_adapt.errors import ContextOverflowError
    from edge_adapt.eval.config import EvalConfig
    from edge_adapt.eval.run import pool_engine
    from edge_adapt.tasks.files import jsonl_suite

    suite = tmp_path / "long.jsonl"
    suite.write_text(json.dumps({"id": "short", "prompt": "What is 1 + 1?", "answer": "2"}) + "\n"
                     + json.dumps({"id": "long", "prompt": "Add these: " + "1 " * 9000, "answer": "9000"}) + "\n")
    with pytest.raises(ContextOverflowError, match=r"^the longest prompt \('long', \d+ tokens\), max_tokens 16 and "
                       r"the self-evaluation suffix \(3 tokens\) need \d+ tokens, more than the model's training "
                       r"context of 8192$"):
        pool_engine(EvalConfig(k=2, max_tokens=16, prune_points=[8]), [jsonl_suite(suite)])
    # label sizes its pool the same way, with no suffix and no prompt id at hand
    with pytest.raises(ContextOverflowError, match=r"^the longest prompt \(9000 tokens\), max_tokens 16 need 9016 "
                       r"tokens, more than the model's training context of 8192$"):
        load_engine(for_pool(9000, 2, 16, 0), EngineOptions(device="cpu"))


def test_a_default_context_is_never_below_the_engines_least():
    """A model trained for 32 tokens: the default context was its training context, and run refused it with
    `ctx: Input should be >= 64`, a setting the user never gave. It is refused for what it is."""
    import dataclasses

    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.sizing import default_ctx, trained_ctx

    from edge_adapt.engine.engine import check_training_context

    info = inspect_gguf(default_model_path())
    short = dataclasses.replace(info, n_ctx_train=32)
    assert default_ctx(2048, short) == 64 and trained_ctx(for_generation([1] * 10, 1, 16), short) == 64
    with pytest.raises(BudgetError, match="^the model was trained for a context of 32 tokens, fewer than the 64 an "
                                          "engine needs$"):  # the engine's own check, not "--ctx 64 exceeds"
        check_training_context(default_ctx(2048, short), short)
    assert default_ctx(2048, info) == 2048 and default_ctx(100, dataclasses.replace(info, n_ctx_train=300)) == 100


def test_growing_an_engine_past_the_models_training_names_what_needs_it():
    """Was: a scorer whose suffix outgrew a pool's context made ensure() resize into `--ctx ... exceeds`."""
    from edge_adapt.errors import ContextOverflowError

    with Engine(parallel=2, ctx=256, device="cpu") as e:
        with pytest.raises(ContextOverflowError, match=r"^the longest prompt \('p', 9000 tokens\), max_tokens 16 "
                           r"and the self-evaluation suffix \(40 tokens\) need 9056 tokens"):
            ensure(e, for_pool(9000, 2, 16, 40, prompt="p"))
        assert e.n_ctx_seq == 256  # left as it was


def test_generation_sizing_names_n_and_max_tokens_not_the_engines_parallel():
    """Was: n=0 and n=300 blamed `engine options: parallel`, n=2.5 printed a pydantic serializer warning, and a
    negative max_tokens sized an engine."""
    import warnings

    from edge_adapt.errors import UsageError

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n, message in [(0, r"^n must be a whole number >= 1, got 0$"), (2.5, r"^n must be a whole number"),
                           (True, r"^n must be a whole number"),
                           (300, r"^n \(300\) is more samples than one llama.cpp context holds at once \(25\d\)$")]:
            with pytest.raises(UsageError, match=message):
                for_generation([1, 2, 3], n, 8)
        with pytest.raises(UsageError, match=r"^max_tokens must be a whole number >= 1, got -5$"):
            for_generation([1, 2, 3], 2, -5)


def test_a_memory_budget_that_is_no_size_is_named_not_read_as_bytes():
    """Was: mem_budget=True was 1 byte: `--mem-budget True bytes is too small`."""
    from edge_adapt.errors import UsageError
    from edge_adapt.sizing import check_budget

    for budget in (True, -5, 1.5):
        with pytest.raises(UsageError, match=rf"^mem_budget is a number of bytes or a size such as '1.5GB', got "
                                             rf"{budget!r}$"):
            check_budget(EngineOptions(device="cpu"), budget)


def test_engine_for_strategy_takes_a_config_as_run_strategy_does():
    """Was: a dict config, which run_strategy takes, raised AttributeError: 'dict' object has no attribute."""
    from edge_adapt.errors import UsageError

    engine, plan = engine_for_strategy(PROMPT, {"strategy": "single", "max_tokens": 8}, EngineOptions(device="cpu"))
    with engine:
        assert plan.config.max_tokens == 8 and engine.options.parallel == plan.sequences
        assert collect(run_strategy(engine, plan.prompt, plan.config)).chosen is not None
    with pytest.raises(UsageError, match=r"^strategy config: budget: "):
        engine_for_strategy(PROMPT, {"strategy": "best-of-n", "budget": 0}, EngineOptions(device="cpu"))
