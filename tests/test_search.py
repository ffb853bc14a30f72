"""Snell-style search strategies (beam, lookahead, revise, weighted best-of-N, auto) against the scripted fake
engine and scorer of test_strategies: pure mechanics, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_adapt.engine.events import Cancelled, Done, Finished, SampleStarted, Token
from edge_adapt.result import collect
from edge_adapt.errors import UsageError
from edge_adapt.strategies import Chosen, Pruned, RoundStarted, Scored, StrategyConfig, run_strategy
from edge_adapt.strategies.auto import prepare, sub_config
from edge_adapt.strategies.events import DifficultyEstimated, RolledOut
from edge_adapt.selfeval.config import SelfEvalConfig
from edge_adapt.strategies.policy import Policy, self_eval_name
from edge_adapt.strategies.revise import MAX_IN_CONTEXT, revision_turn
from test_strategies import (  # tests/ is on sys.path under pytest
    CancelledEngine, FakeScorer, chosen, fresh, of, run, usage, words,
)

STEP = ["a", "b\n"]  # every sample writes two-token steps


def steps(n_steps: int):
    return lambda i: STEP * n_steps


def by_round(events: list) -> list[list]:
    rounds: list[list] = []
    for ev in events:
        if isinstance(ev, RoundStarted):
            rounds.append([])
        elif rounds:
            rounds[-1].append(ev)
    return rounds


def unique_score(i: int, n: int) -> float:
    return ((i * 37 + n * 11) % 101) / 101


# -- beam -------------------------------------------------------------------------------------------------
def test_beam_keeps_exactly_the_top_n_over_m_each_round():
    e = fresh(steps(5))
    ev = run(e, FakeScorer(unique_score), strategy="beam", budget=8, beam_width=4, max_tokens=64)
    rounds = by_round(ev)
    assert len(rounds) == 6  # five steps, then the end of generation
    for r in rounds[:-1]:
        scored = {x.sample: x.p_keep for x in of(r, Scored)}
        assert len(scored) == 8
        top = sorted(scored, key=scored.get, reverse=True)[:2]
        assert {x.sample for x in of(r, Pruned)} == set(scored) - set(top)
        assert len(of(r, SampleStarted)) == 8  # the two kept beams, expanded 4 ways each
    assert e.free_sequences == 32


def test_beam_children_continue_their_parent():
    e = fresh(steps(3))
    run(e, FakeScorer(unique_score), strategy="beam", budget=4, beam_width=2, max_tokens=64)
    assert e.branched
    for child in e.branched:
        assert child.text.startswith("a b\n") and child.text.count("\n") >= 2  # the parent's step, then its own


def assert_branches_rebuild_every_text(ev: list) -> None:
    """As the README has a caller rebuild texts: a branch starts from its parent's text (SampleStarted.parent),
    then its Token texts, then Finished.tail make its Finished.text."""
    started = {x.sample: x for x in of(ev, SampleStarted)}
    finished = {x.sample: x for x in of(ev, Finished)}
    parents = {x.parent for x in started.values() if x.parent is not None}
    assert parents and all(started[p].sample < c for c, x in started.items() for p in [x.parent] if p is not None)
    # Every sample ends once: with a Finished, or continued by its branches.
    assert set(started) == set(finished) | parents and not set(finished) & parents
    texts: dict[int, str] = {}
    for x in ev:
        if isinstance(x, SampleStarted):
            texts[x.sample] = "" if x.parent is None else texts[x.parent]
        elif isinstance(x, Token):
            texts[x.sample] += x.text
        elif isinstance(x, Finished):
            assert texts[x.sample] + x.tail == x.text


def test_beam_events_name_each_branchs_parent_and_the_stream_rebuilds_every_text():
    e = fresh(steps(3))
    ev = run(e, FakeScorer(unique_score), strategy="beam", budget=4, beam_width=2, max_tokens=64)
    assert_branches_rebuild_every_text(ev)


def test_beam_stops_at_the_round_limit():
    e = fresh(steps(50))
    ev = run(e, FakeScorer(unique_score), strategy="beam", budget=4, beam_width=2, max_rounds=3, max_tokens=256)
    assert len(of(ev, RoundStarted)) == 3
    c = chosen(ev)
    assert c.n_tokens == 6 and c.finish == "length"  # three two-token steps, cut by the limit
    live_at_end = [f for f in of(ev, Finished) if f.reason == "length"]
    assert len(live_at_end) == 4
    assert e.free_sequences == 32


def test_step_ends_at_max_step_tokens_without_a_delimiter():
    e = fresh(lambda i: ["w"] * 20)
    ev = run(e, FakeScorer(unique_score), strategy="beam", budget=2, beam_width=2, max_step_tokens=5, max_rounds=2,
             max_tokens=64)
    assert {x.n_tokens for x in of(by_round(ev)[0], Scored)} == {5}
    assert chosen(ev).n_tokens == 10


def test_beam_picks_by_weighted_vote_over_finished_beams():
    # beams end at their first step; answers "1","1","2","3" with scores .3,.3,.5,.1: "1" weighs .6 > .5
    answers = {0: "1", 1: "1", 2: "2", 3: "3"}
    e = fresh(lambda i: [answers[i]])
    ev = run(e, FakeScorer(lambda i, n: {0: .3, 1: .3, 2: .5, 3: .1}[i]), strategy="beam", budget=4, beam_width=2)
    c = chosen(ev)
    assert c.answer == "1" and c.votes == pytest.approx(0.6) and c.sample in (0, 1)


# -- lookahead --------------------------------------------------------------------------------------------
def test_lookahead_rollouts_are_discarded_and_counted():
    e = fresh(steps(4))
    sc = FakeScorer(unique_score)
    ev = run(e, sc, strategy="lookahead", budget=4, beam_width=2, lookahead=2, max_tokens=64)
    rolled = of(ev, RolledOut)
    assert rolled and all(r.n_tokens <= 4 for r in rolled)  # two two-token steps at most
    u = usage(ev)
    assert u.extra["rollout_tokens"] == sum(r.n_tokens for r in rolled)
    # Roll-out tokens are generated compute, counted; not streamed: a UI keyed on sample index would show a
    # sample that never started nor finished.
    assert u.generated_tokens == len(of(ev, Token)) + u.extra["rollout_tokens"]
    announced = {s.sample for s in of(ev, SampleStarted)}
    assert {t.sample for t in of(ev, Token)} <= announced
    assert not announced & {r.sample for r in rolled} - announced  # roll-outs are never announced as samples
    assert chosen(ev).sample in announced
    # nor do they end as samples: only announced samples finish, so collect() lists no roll-out
    assert {f.sample for f in of(ev, Finished)} <= announced
    assert {s.index for s in collect(ev).samples} <= announced
    # a beam's score is its roll-out's: the scorer saw the roll-out k steps further on
    scored_lengths = [n for call in sc.calls for _, n in call]
    assert max(scored_lengths) == 9  # a beam three steps in, rolled out by the last step and the end of text
    assert e.free_sequences == 32


def test_lookahead_score_is_the_rollout_score():
    e = fresh(steps(6))
    sc = FakeScorer(lambda i, n: n / 100)  # a longer look scores higher
    ev = run(e, sc, strategy="lookahead", budget=2, beam_width=2, lookahead=1, max_rounds=1, max_tokens=64)
    first = of(ev, Scored)
    assert [s.n_tokens for s in first] == [2, 2]  # the beams are two tokens in
    assert [s.p_keep for s in first] == [0.04, 0.04]  # ... and scored at four (the roll-out's end)


# -- weighted best-of-n -----------------------------------------------------------------------------------
def test_weighted_best_of_n_marginalises_over_answers():
    answers = {0: "5", 1: "5", 2: "7", 3: "9"}
    scores = {0: 0.3, 1: 0.35, 2: 0.5, 3: 0.2}
    e = fresh(lambda i: [f"so {answers[i]}"])
    ev = run(e, FakeScorer(lambda i, n: scores[i]), strategy="weighted-best-of-n", budget=4)
    c = chosen(ev)
    assert c.answer == "5" and c.votes == pytest.approx(0.65) and c.sample == 1
    assert dict(c.tally) == pytest.approx({"5": 0.65, "7": 0.5, "9": 0.2})
    plain = chosen(run(fresh(lambda i: [f"so {answers[i]}"]), FakeScorer(lambda i, n: scores[i]), strategy="best-of-n",
                       budget=4))
    assert plain.sample == 2  # plain best-of-n takes the single best score


# -- revise -----------------------------------------------------------------------------------------------
def test_revisions_keep_at_most_four_attempts_in_context():
    e = fresh(lambda i: ["x", "y"])
    ev = run(e, FakeScorer(unique_score), strategy="revise", budget=7, sequential_ratio=1.0, max_tokens=8)
    turn = revision_turn(e, StrategyConfig().revise_prompt)
    attempts = e.started
    assert len(attempts) == 7 and len(of(ev, RoundStarted)) == 7
    for j, (a, ctx) in enumerate(zip(attempts, e.contexts)):
        after_prompt = ctx[3:]  # the prompt is [1, 2, 3]
        shown = attempts[max(0, j - MAX_IN_CONTEXT) : j]
        expected = [t for s in shown for t in s.generated[:-1] + turn]  # each attempt without its EOS, then the turn
        assert after_prompt == expected
    assert e.free_sequences == 32


def test_revise_splits_the_budget_into_chains():
    e = fresh(lambda i: ["x"])
    ev = run(e, FakeScorer(unique_score), strategy="revise", budget=8, sequential_ratio=0.25)
    assert [r.n for r in of(ev, RoundStarted)] == [4, 4]  # 4 chains of 2 attempts
    assert usage(ev).samples_started == 8


@pytest.mark.parametrize("budget, rounds", [(2, [1, 1]), (3, [2, 1]), (5, [2, 2, 1]), (7, [2, 2, 2, 1])])
def test_revise_spends_the_whole_budget_and_revises(budget, rounds):
    """At the default ratio: two chains, the first longer by one when the budget is odd; budget 2 is one attempt
    and its revision."""
    e = fresh(lambda i: ["x"])
    ev = run(e, FakeScorer(unique_score), strategy="revise", budget=budget)
    assert [r.n for r in of(ev, RoundStarted)] == rounds
    assert usage(ev).samples_started == len(e.started) == budget
    turn = revision_turn(e, StrategyConfig().revise_prompt)
    first = e.started[0].generated[:-1] + turn
    assert e.contexts[-1][3 : 3 + len(first)] == first  # the last attempt is a revision of the first chain


@pytest.mark.parametrize("ratio, lengths", [(0.0, (2, 1, 1)), (0.25, (2, 1, 1)), (0.4, (2, 1, 1)), (0.5, (2, 2)),
                                            (0.6, (2, 2)), (0.75, (4,)), (1.0, (4,))])
def test_revise_chain_length_follows_the_ratio(ratio, lengths):
    """About 1/ratio chains of budget x ratio attempts; at most budget - 1 chains, so that one revises."""
    rounds = [sum(n > r for n in lengths) for r in range(lengths[0])]
    ev = run(fresh(lambda i: ["x"]), FakeScorer(unique_score), strategy="revise", budget=4, sequential_ratio=ratio)
    assert [r.n for r in of(ev, RoundStarted)] == rounds and usage(ev).samples_started == 4


def test_revise_answers_by_weighted_vote_over_all_attempts():
    answers = {0: "3", 1: "4", 2: "4"}
    e = fresh(lambda i: [answers[i]])
    ev = run(e, FakeScorer(lambda i, n: {0: 0.6, 1: 0.4, 2: 0.4}[i]), strategy="revise", budget=3,
             sequential_ratio=1.0)
    assert chosen(ev).answer == "4"


def test_revise_context_need_is_checked_up_front():
    from edge_adapt.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match="attempts in context"):
        run(fresh(n_ctx_seq=600), FakeScorer(unique_score), strategy="revise", budget=8, sequential_ratio=1.0,
            max_tokens=96)


# -- auto -------------------------------------------------------------------------------------------------
def policy_file(tmp_path, model="fake", **change):
    data = {
        "format": "edge-adapt-policy/1", "model": model, "bin_edges": [0.2, 0.4, 0.6, 0.8],
        "budgets": {
            "4": [{"strategy": "probe"}] * 4 + [{"strategy": "best-of-n", "options": {"budget": 3}}],
            "8": [{"strategy": "probe"}] * 3 + [{"strategy": "best-of-n", "options": {"budget": 4}},
                                                  {"strategy": "weighted-vote", "options": {"budget": 7}}],
        },
    }
    data.update(change)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    return path


def test_auto_answers_an_easy_prompt_with_the_probe(tmp_path):
    e = fresh()
    ev = run(e, FakeScorer(lambda i, n: 0.9), strategy="auto", budget=8, policy=policy_file(tmp_path))
    (d,) = of(ev, DifficultyEstimated)
    assert (d.bin, d.choice) == (1, "probe")
    assert chosen(ev).sample == 0 and usage(ev).samples_started == 1
    assert usage(ev).extra["difficulty_bin"] == 1
    assert e.started[0].params.temperature == 0.0  # the probe is greedy


def test_auto_runs_the_policy_choice_for_a_hard_prompt(tmp_path):
    e = fresh()
    ev = run(e, FakeScorer(lambda i, n: 0.1 if i == 0 else 0.5), strategy="auto", budget=8, policy=policy_file(tmp_path))
    (d,) = of(ev, DifficultyEstimated)
    assert (d.bin, d.choice) == (5, "weighted-vote")
    started = [s.sample for s in of(ev, SampleStarted)]
    assert started == list(range(8))  # the probe, then the 7 of the chosen strategy, numbered after it
    assert chosen(ev).sample in started[1:]
    assert e.free_sequences == 32


def test_auto_uses_the_largest_tuned_budget_that_fits(tmp_path):
    ev = run(fresh(), FakeScorer(lambda i, n: 0.1), strategy="auto", budget=6, policy=policy_file(tmp_path))
    assert usage(ev).samples_started == 4  # budget 4's row: the probe + best-of-3


@pytest.mark.parametrize("budget, row", [(64, 8), (6, 4), (8, None)])
def test_auto_says_which_row_ran_when_the_policy_has_none_for_the_budget(tmp_path, budget, row):
    """Was: --budget 64 with a policy whose largest row is 16 ran that row in silence (16 samples, nothing said)."""
    ev = run(fresh(), FakeScorer(lambda i, n: 0.1), strategy="auto", budget=budget, policy=policy_file(tmp_path))
    assert of(ev, DifficultyEstimated)[0].row_budget == row
    assert collect(ev).to_dict()["difficulty"]["row_budget"] == row  # run --json


class ConfiguredScorer(FakeScorer):
    """A scorer with a self-eval config, as SelfEvaluator has."""

    def __init__(self, fn, config: SelfEvalConfig) -> None:
        super().__init__(fn)
        self.config = config


TUNED = SelfEvalConfig(format="raw", suffix="<|im_end|>Restart", yes=" Yes", no=" No", adapter="/tune/here/se.gguf")


@pytest.mark.parametrize("used", [TUNED, TUNED.model_copy(update={"adapter": Path("/elsewhere/se.gguf")}),
                                  TUNED.model_copy(update={"default_adapter": False})])
def test_auto_runs_with_the_self_evaluation_its_policy_was_tuned_with(tmp_path, used):
    """The same suffix, answers and adapter file (from wherever it is read) score on the policy's scale."""
    path = policy_file(tmp_path, self_eval=self_eval_name(ConfiguredScorer(None, TUNED)))
    ev = run(fresh(), ConfiguredScorer(lambda i, n: 0.9, used), strategy="auto", budget=8, policy=path)
    assert of(ev, DifficultyEstimated)[0].bin == 1


def test_a_scorer_of_another_class_with_the_policys_config_runs_it(tmp_path):
    """The server scores with a SelfEvaluator subclass that counts its decodes: the policy names the class it was
    tuned with, and a comparison of classes refused every server auto request with the shipped policy."""
    class Counting(ConfiguredScorer):
        pass

    path = policy_file(tmp_path, self_eval=self_eval_name(ConfiguredScorer(None, TUNED)))
    ev = run(fresh(), Counting(lambda i, n: 0.9, TUNED), strategy="auto", budget=8, policy=path)
    assert of(ev, DifficultyEstimated)[0].bin == 1


@pytest.mark.parametrize("used, ours", [
    (SelfEvalConfig(default_adapter=False), "adapter=None format='chat' no='No' question='Would you do better"),
    (TUNED.model_copy(update={"adapter": Path("other.gguf")}), "adapter='other.gguf'"),
])
def test_auto_refuses_a_policy_tuned_with_another_self_evaluation(tmp_path, used, ours):
    """Was: --adapter none ran the shipped policy, whose bin edges are the adapter's p_keep quantiles: a prompt the
    adapter put in bin 3 landed in bin 1 and got no compute past the probe."""
    path = policy_file(tmp_path, self_eval=self_eval_name(ConfiguredScorer(None, TUNED)))
    e = fresh()
    with pytest.raises(UsageError) as err:
        run(e, ConfiguredScorer(lambda i, n: 0.9, used), strategy="auto", budget=8, policy=path)
    message = str(err.value)
    assert "the policy was tuned with self-evaluation adapter='se.gguf'" in message
    assert f"this run scores with {ours}" in message and "tune a policy for this one" in message
    assert "\n" not in message and err.value.field == "policy" and not e.started  # before the probe


def test_a_policy_is_compared_on_what_decides_the_score(tmp_path):
    """A field added to the config since the policy was tuned (missing from its record: taken as its default), or a
    question its raw format never asks, does not refuse it."""
    record = json.loads(self_eval_name(ConfiguredScorer(None, TUNED)).partition(":")[2])
    del record["adapter_scale"]
    path = policy_file(tmp_path, self_eval="x:" + json.dumps({**record, "question": "Other?", "added_since": 1}))
    ev = run(fresh(), ConfiguredScorer(lambda i, n: 0.9, TUNED), strategy="auto", budget=8, policy=path)
    assert of(ev, DifficultyEstimated)[0].bin == 1


@pytest.mark.parametrize("tuned", ["", "selfeval-lora:adapter=se.gguf:0123:suffix=[2, 7]"])
def test_a_policy_naming_no_self_eval_config_runs_with_any(tmp_path, tuned):
    """An older policy records none, one tuned through a server records the server's identity: nothing to compare."""
    path = policy_file(tmp_path, self_eval=tuned)
    ev = run(fresh(), ConfiguredScorer(lambda i, n: 0.9, SelfEvalConfig()), strategy="auto", budget=8, policy=path)
    assert isinstance(ev[-2], Chosen)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(budget=2), "budget 2 is too small for this policy (smallest tuned budget: 4)"),
        (dict(model="llama:1:2:Q8_0"), "tuned for model llama:1:2:Q8_0, not this one (fake)"),
        (dict(budgets={"4": [{"strategy": "warp"}] * 5}), "unknown strategy 'warp'"),
        (dict(budgets={"4": [{"strategy": "probe"}] * 3}), "5 choices, one per bin"),
        (dict(format="other/1"), "is not an edge-adapt policy"),
        (dict(budgets={"4": [{"strategy": "vote", "options": {"extractor": "regex", "pattern": "(.*)*!"}}] * 5}),
         "spends compute, not extractor, pattern"),
        (dict(budgets={"4": [{"strategy": "best-of-n", "options": {"self_eval": {"adapter": "/etc/passwd"}}}] * 5}),
         "not self_eval"),
        # Python's json writes and reads NaN / Infinity; NaN edges compared false both ways: every prompt in bin 5.
        (dict(bin_edges=[float("nan")] * 4), "bin_edges: must be 4 non-decreasing finite numbers, got [nan, nan"),
        (dict(bin_edges=[0.2, 0.4, 0.6, float("inf")]), "bin_edges: must be 4 non-decreasing finite numbers"),
        (dict(probe_temperature=float("inf")), "probe_temperature: must be a finite number"),
        (dict(budgets={"4": [{"strategy": "adaptive", "options": {"threshold": float("nan")}}] * 5}),
         "option threshold must be finite, got nan"),
        (dict(budgets={"4": [{"strategy": "probe", "accuracy": float("nan")}] + [{"strategy": "probe"}] * 4}),
         "accuracy: Input should be a finite number"),
        # The probe is one of the row's samples: a choice may spend the rest, no more (budget 200 started 201
        # samples for a caller's budget of 4).
        (dict(budgets={"4": [{"strategy": "probe"}] * 2 + [{"strategy": "best-of-n", "options": {"budget": 200}}] * 3}),
         "the choice in bin 3 at budget 4 (best-of-n budget=200) starts 200 samples after the probe; the row's "
         "budget leaves 3"),
        (dict(budgets={"4": [{"strategy": "probe"}] * 4 + [{"strategy": "vote", "options": {"n": 4}}]}),
         "the choice in bin 5 at budget 4 (vote n=4) starts 4 samples after the probe"),
        # A budget as text is StrategyConfig's to read: refused when the run is planned, before any decode.
        (dict(budgets={"4": [{"strategy": "best-of-n", "options": {"budget": "200"}}] * 5}),
         "the policy's choice in bin 1 at budget 4 (best-of-n budget=200) starts 200 samples after the probe; "
         "the row's budget leaves 3"),
    ],
)
def test_auto_bad_policy_or_budget_is_a_one_line_error_before_decoding(tmp_path, kw, message):
    budget = kw.pop("budget", 8)
    path = policy_file(tmp_path, **kw)
    e = fresh()
    with pytest.raises(UsageError) as err:
        run_strategy(e, [1, 2, 3], StrategyConfig(strategy="auto", budget=budget, policy=path), FakeScorer(unique_score))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert e.decode_calls == 0


def test_auto_runs_a_choice_as_tuned_whatever_the_callers_spending_settings(tmp_path):
    """keep and temperature are the caller's settings for strategies it names: a keep of 5 made the policy's
    best-of-4 refuse to run ("keep (5) must be <= budget (4)"), and a temperature changed what was tuned."""
    e = fresh()
    cfg = StrategyConfig(strategy="auto", budget=8, keep=5, temperature=1.3, policy=policy_file(tmp_path))
    # unread_ok: as a chat keeps them for the strategies it switches to (run_strategy refuses them otherwise)
    ev = list(run_strategy(e, [1, 2, 3], cfg, FakeScorer(lambda i, n: 0.3), unread_ok=True))
    assert of(ev, DifficultyEstimated)[0].choice == "best-of-n" and usage(ev).samples_started == 5
    assert {s.params.temperature for s in e.started[1:]} == {StrategyConfig().temperature}


@pytest.mark.parametrize("prune_at, max_tokens, runs, points", [
    ([32], 32, "best-of-n", None),  # refused before: "prune point 32 is not below max_tokens (32)"
    ([4, 32], 32, "prune", (4,)),
    ([4, 32], 64, "prune", (4, 32)),
])
def test_auto_leaves_out_prune_points_the_replies_never_reach(tmp_path, prune_at, max_tokens, runs, points):
    choice = {"strategy": "prune", "options": {"budget": 4, "k": 1, "prune_at": prune_at}}
    path = policy_file(tmp_path, budgets={"8": [choice] * 5})
    cfg = prepare(StrategyConfig(strategy="auto", budget=8, max_tokens=max_tokens, policy=path), fresh())
    sub = sub_config(cfg, cfg.policy, 3)
    assert sub.strategy == runs and sub.budget == 4 and sub.max_tokens == max_tokens
    assert points is None or sub.prune_at == points
    ev = run(fresh(), FakeScorer(lambda i, n: 0.5), strategy="auto", budget=8, max_tokens=max_tokens, policy=path)
    assert of(ev, DifficultyEstimated)[0].choice == runs and isinstance(ev[-2], Chosen)


def test_a_choice_naming_its_budget_n_spends_that(tmp_path):
    path = policy_file(tmp_path, budgets={"8": [{"strategy": "best-of-n", "options": {"n": 2}}] * 5})
    ev = run(fresh(), FakeScorer(lambda i, n: 0.5), strategy="auto", budget=8, policy=path)
    assert usage(ev).samples_started == 3  # the probe and best-of-2, not the row's 7


def test_the_shipped_policy_loads_and_fits_its_rows():
    from edge_adapt.engine.default_model import default_policy

    policy = Policy.load(default_policy())
    assert policy.budgets and all(c.strategy == "probe" or c.budget(b) <= b - 1
                                  for b, row in policy.budgets.items() for c in row)


def test_auto_running_beam_names_each_branchs_parent_after_the_probe(tmp_path):
    """The probe is sample 0 and the beam's samples follow it: a branch's parent is renumbered as its own index
    is, so the stream rebuilds every branch's text from its parent's."""
    choice = {"strategy": "beam", "options": {"budget": 4, "beam_width": 2}}
    path = policy_file(tmp_path, budgets={"5": [choice] * 5})
    ev = run(fresh(steps(3)), FakeScorer(unique_score), strategy="auto", budget=5, policy=path, max_tokens=64)
    assert of(ev, DifficultyEstimated)[0].choice == "beam"
    assert_branches_rebuild_every_text(ev)


def test_a_cancel_while_autos_choice_votes_ends_with_cancelled(tmp_path):
    """vote decodes nothing after its samples: once cancelled it answered with one cut short."""
    path = policy_file(tmp_path, budgets={"4": [{"strategy": "vote", "options": {"budget": 3}}] * 5})
    e = CancelledEngine(words(5), after=8)  # the probe's 6 tokens, then 2 of the vote's
    seen = []
    with pytest.raises(Cancelled):
        for x in run_strategy(e, [1, 2, 3], StrategyConfig(strategy="auto", budget=4, policy=path),
                              FakeScorer(lambda i, n: 0.5)):
            seen.append(x)
    assert of(seen, DifficultyEstimated)[0].choice == "vote" and "cancelled" in {f.reason for f in of(seen, Finished)}
    assert not of(seen, Chosen) and not of(seen, Done) and e.free_sequences == 32


def test_a_choice_without_a_budget_spends_the_rows_less_the_probe(tmp_path):
    path = policy_file(tmp_path, budgets={"6": [{"strategy": "best-of-n"}] * 5})
    ev = run(fresh(), FakeScorer(lambda i, n: 0.5), strategy="auto", budget=7, policy=path)
    assert usage(ev).samples_started == 6


def test_a_policy_choice_that_cannot_run_is_named_in_its_error(tmp_path):
    path = policy_file(tmp_path, budgets={"8": [{"strategy": "prune", "options": {"budget": 4, "k": 5}}] * 5})
    with pytest.raises(UsageError, match=r"the policy's choice in bin 1 at budget 8 \(prune budget=4 k=5\) cannot "
                                         r"run here: .*keep \(5\) must be <= budget \(4\)"):
        run_strategy(fresh(), [1, 2, 3], StrategyConfig(strategy="auto", budget=8, policy=path), FakeScorer(unique_score))


def test_policy_options_are_strategy_config_settings():
    from edge_adapt.strategies.policy import POLICY_OPTIONS

    names = set()
    for name, field in StrategyConfig.model_fields.items():
        alias = field.validation_alias
        names |= {name, *(alias.choices if alias is not None else ())}
    assert POLICY_OPTIONS <= names
    for owned_by_the_caller in ("max_tokens", "stop", "seed", "self_eval", "extractor", "pattern", "policy"):
        assert owned_by_the_caller not in POLICY_OPTIONS


def test_policy_bins_run_from_easy_to_hard(tmp_path):
    p = Policy.load(policy_file(tmp_path))
    assert [p.bin_of(x) for x in (0.95, 0.8, 0.7, 0.5, 0.3, 0.2, 0.05)] == [1, 1, 2, 3, 4, 4, 5]
