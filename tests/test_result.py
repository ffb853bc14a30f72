"""collect: an event stream folded into a Result, the same for engine and strategy streams."""

from __future__ import annotations

import pytest

from edge_adapt.engine import Engine, SamplingParams
from edge_adapt.result import Collector, collect
from edge_adapt.errors import EdgeAdaptError
from edge_adapt.strategies import Scored, StrategyConfig, run_strategy

from test_strategies import FakeScorer, fresh, words


def test_collect_folds_a_strategy_stream():
    events = list(run_strategy(fresh(words(5)), [1, 2], StrategyConfig(strategy="prune", budget=4, k=1, prune_at=(2,),
                                                                        max_tokens=16), FakeScorer(lambda i, n: i / 10)))
    r = collect(events)
    assert [s.index for s in r.samples] == [0, 1, 2, 3]
    assert [s.finish_reason for s in r.samples] == ["pruned", "pruned", "pruned", "eos"]
    # every Scored event lands on its sample, in order
    scored = [e for e in events if isinstance(e, Scored)]
    assert sum(len(s.scores) for s in r.samples) == len(scored)
    assert r.samples[3].scores == ((2, 0.3), (6, 0.3))
    assert r.chosen is not None and r.chosen.sample == 3 and r.text == r.samples[3].text == "w3 " * 5
    assert r.usage.samples_started == 4 and r.usage.samples_pruned == 3
    d = r.to_dict()
    assert d["chosen"]["sample"] == 3 and d["samples"][3]["scores"] == [[2, 0.3], [6, 0.3]]
    assert d["usage"]["generated_tokens"] == r.usage.generated_tokens and d["difficulty"] is None


def test_collect_folds_an_engine_stream(engine: Engine):
    prompt = engine.tokenize(engine.chat_prompt([{"role": "user", "content": "Name a colour."}]))
    r = collect(engine.generate(prompt, SamplingParams(temperature=0.8, seed=3), n=2, max_tokens=5))
    assert r.chosen is None and len(r.samples) == 2 and r.text == r.samples[0].text
    assert r.usage.generated_tokens == sum(s.tokens for s in r.samples) and r.usage.samples_started == 2
    assert all(s.scores == () and s.mean_logprob < 0 for s in r.samples)


def test_a_stream_not_read_to_its_end_is_no_result():
    events = run_strategy(fresh(words(5)), [1], StrategyConfig(strategy="best-of-n", budget=2), FakeScorer(lambda i, n: 0.5))
    c = Collector()
    c.add(next(events))
    events.close()
    with pytest.raises(EdgeAdaptError, match="without Done"):
        c.result()
