"""The search strategies on the embedded model with its shipped self-eval adapter: they run end to end through
`run_strategy`, account for their compute and give every sequence back."""

from __future__ import annotations

import json

import pytest

from edge_adapt.engine import Engine, Token
from edge_adapt.engine.events import Done, SampleStarted
from edge_adapt.selfeval import SelfEvaluator
from edge_adapt.strategies import Chosen, StrategyConfig, run_strategy
from edge_adapt.strategies.events import DifficultyEstimated, RolledOut, RoundStarted

pytestmark = pytest.mark.slow

PROMPT = "Tom has 3 apples and gets 4 more. How many apples does Tom have now? Think step by step."


def run(engine: Engine, **cfg) -> list:
    config = StrategyConfig(max_tokens=24, **cfg)
    return list(run_strategy(engine, PROMPT, config, SelfEvaluator(engine)))


def the(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def test_beam_search_on_the_model(engine: Engine):
    ev = run(engine, strategy="beam", budget=4, beam_width=2, max_step_tokens=8)
    (chosen,) = the(ev, Chosen)
    usage = the(ev, Done)[0].usage
    assert chosen.text and chosen.p_keep is not None
    assert len(the(ev, RoundStarted)) >= 2  # 24 tokens in steps of at most 8
    assert usage.generated_tokens == len(the(ev, Token))
    assert usage.samples_started > 4  # expansions are new samples continuing their parents


def test_lookahead_on_the_model_counts_its_rollouts(engine: Engine):
    ev = run(engine, strategy="lookahead", budget=4, beam_width=2, max_step_tokens=8, lookahead=1)
    usage = the(ev, Done)[0].usage
    rolled = the(ev, RolledOut)
    assert rolled and usage.extra["rollout_tokens"] == sum(r.n_tokens for r in rolled) > 0
    announced = {s.sample for s in the(ev, SampleStarted)}
    assert the(ev, Chosen)[0].sample in announced and {t.sample for t in the(ev, Token)} <= announced
    assert usage.generated_tokens == len(the(ev, Token)) + usage.extra["rollout_tokens"]


def test_revise_on_the_model(engine: Engine):
    ev = run(engine, strategy="revise", budget=4, sequential_ratio=0.5)
    assert [r.n for r in the(ev, RoundStarted)] == [2, 2]
    assert the(ev, Done)[0].usage.samples_started == 4
    assert the(ev, Chosen)[0].text


def test_auto_on_the_model_with_a_policy(engine: Engine, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "format": "edge-adapt-policy/1", "model": engine.fingerprint, "bin_edges": [0.99, 0.995, 0.998, 0.999],
        "budgets": {"4": [{"strategy": "probe"}] * 4 + [{"strategy": "best-of-n", "options": {"budget": 3}}]},
    }))
    ev = run(engine, strategy="auto", budget=4, policy=path)
    (d,) = the(ev, DifficultyEstimated)
    assert d.bin == 5 and d.choice == "best-of-n"  # no probe scores 0.99
    assert the(ev, Done)[0].usage.samples_started == 4


def test_auto_runs_the_shipped_policy_with_the_shipped_adapter_only(engine: Engine):
    """The shipped policy's bins are the shipped adapter's p_keep quantiles: without it (--adapter none) a prompt
    the adapter put in bin 3 landed in bin 1 and was answered with the probe alone."""
    from edge_adapt.errors import UsageError
    from edge_adapt.selfeval.config import SelfEvalConfig

    config = StrategyConfig(strategy="auto", budget=2, max_tokens=4)
    assert the(list(run_strategy(engine, PROMPT, config, SelfEvaluator(engine))), Chosen)
    bare = SelfEvaluator(engine, SelfEvalConfig(default_adapter=False))
    with pytest.raises(UsageError, match="tuned with self-evaluation adapter='smollm2-135m-selfeval.gguf'"):
        list(run_strategy(engine, PROMPT, config, bare))


@pytest.mark.parametrize("name", ("single", "vote"))
def test_a_cancel_during_a_strategy_that_decodes_nothing_after_its_samples_raises_cancelled(engine: Engine, name):
    """As best-of-n does at its scoring decode: single and vote answered with a sample cut short instead."""
    from edge_adapt.engine.events import Cancelled

    budget = {} if name == "single" else {"budget": 2}  # single reads none
    seen: list[object] = []
    with pytest.raises(Cancelled):
        for ev in run_strategy(engine, PROMPT, {"strategy": name, **budget, "max_tokens": 24}):
            seen.append(ev)
            if isinstance(ev, Token):
                engine.cancel()  # the user presses Stop
    assert not the(seen, Chosen) and engine.live_sequences == 0
    assert the(list(run_strategy(engine, PROMPT, {"strategy": name, **budget, "max_tokens": 4})), Chosen)  # usable
