"""Compute-optimal policy tuning on hand-made tables and pools: the choice per bin, the tolerance, and
cross-validation that never looks at the fold it reports on."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edge_adapt.errors import UsageError
from edge_adapt.eval import tune
from edge_adapt.eval.pool import PoolSample, PromptPool
from edge_adapt.strategies.policy import PROBE, Policy, PolicyChoice


def table(correct, tokens, probe_scores, levels=None) -> tune.Table:
    choices = [PolicyChoice(strategy=PROBE)] + [
        PolicyChoice(strategy="best-of-n", options={"budget": n}) for n in range(1, len(correct))]
    correct, tokens = np.array(correct, float), np.array(tokens, float)
    return tune.Table(choices, correct, tokens, np.array(probe_scores, float), levels or [None] * correct.shape[1])


def test_choose_takes_the_most_accurate_candidate_per_bin():
    # 10 prompts, two per bin (probe scores .95 .9 | .75 .7 | .55 .5 | .35 .3 | .15 .1)
    scores = [0.95, 0.9, 0.75, 0.7, 0.55, 0.5, 0.35, 0.3, 0.15, 0.1]
    t = table(
        correct=[[1, 1, 0, 0, 0, 0, 0, 0, 0, 0],   # probe: right on the easy bin
                 [1, 1, 1, 1, 0, 0, 1, 0, 0, 0],   # candidate 1
                 [1, 1, 1, 0, 1, 1, 1, 1, 0, 0]],  # candidate 2
        tokens=[[10] * 10, [30] * 10, [90] * 10], probe_scores=scores)
    bins = tune.bins_of(scores, [0.2, 0.4, 0.6, 0.8])
    assert bins.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    picks = tune.choose(t, range(10), bins, tolerance=0.0)
    # bin 1: all tie at 1.0 -> cheapest (probe); bin 2: cand 1; bin 3, 4: cand 2; bin 5: nobody right -> probe
    assert picks == [0, 1, 2, 2, 0]


def test_tolerance_prefers_a_cheaper_choice_that_is_nearly_as_good():
    t = table(correct=[[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], tokens=[[1] * 4, [10] * 4, [100] * 4],
              probe_scores=[0.5] * 4)
    bins = np.array([3, 3, 3, 3])
    assert tune.choose(t, range(4), bins, tolerance=0.0)[2] == 2
    assert tune.choose(t, range(4), bins, tolerance=0.25)[2] == 1


def test_cross_validation_chooses_each_fold_on_the_other():
    # Candidate 1 is right on fold A's prompts only, candidate 2 on fold B's only: choosing on the other fold
    # must always pick the wrong one, so the cross-validated accuracy is 0 although each is perfect in hindsight.
    n = 20
    levels = [1] * n
    folds = tune.folds_of(levels, 2, seed=0)
    a, b = folds
    c1 = [1.0 if i in a else 0.0 for i in range(n)]
    c2 = [1.0 if i in b else 0.0 for i in range(n)]
    t = table(correct=[[0.0] * n, c1, c2], tokens=[[1] * n, [5] * n, [5] * n], probe_scores=[0.5] * n, levels=levels)
    cv = tune.cross_validate(t, budget=4, tolerance=0.0, seed=0)
    assert cv.accuracy == 0.0
    # equal probe scores put every prompt in bin 1; the empty bins default to the probe
    assert [picks[0] for picks in cv.picks] == ["best-of-n budget=2", "best-of-n budget=1"]
    # and the held-out fold's own numbers never change its choice
    t2 = table(correct=[[0.0] * n, [1.0] * n, c2], tokens=[[1] * n, [5] * n, [5] * n], probe_scores=[0.5] * n,
               levels=levels)
    t2.correct[1, b] = 0.0  # candidate 1 is now perfect on fold A, still useless on fold B
    assert tune.cross_validate(t2, 4, 0.0, seed=0).picks[0] == cv.picks[0]


def test_folds_share_every_level():
    levels = [1] * 10 + [2] * 10 + [3] * 6
    f1, f2 = tune.folds_of(levels, 2, seed=3)
    assert sorted(f1 + f2) == list(range(26))
    for lv in (1, 2, 3):
        assert abs(sum(levels[i] == lv for i in f1) - sum(levels[i] == lv for i in f2)) <= 1


def _sample(i: int, correct: bool, score: float, answer: str) -> PoolSample:
    return PoolSample(i, 0.7, i, f"= {answer}", 10, (-1.0,) * 10, "eos", (None, None), score, (0.0, 0.0, 4.0),
                      answer, correct)


def _pools(n: int = 40) -> list[PromptPool]:
    """Easy prompts: a confident right greedy answer. Hard ones: an unsure wrong greedy, half the samples right."""
    out = []
    for j in range(n):
        easy = j % 2 == 0
        greedy = _sample(-1, easy, 0.9 if easy else 0.1 + 0.001 * j, "1" if easy else "2")
        samples = tuple(_sample(i, easy or i % 2 == 0, 0.8 if (easy or i % 2 == 0) else 0.2,
                                "1" if (easy or i % 2 == 0) else "3") for i in range(8))
        out.append(PromptPool(f"k{j}", f"p{j}", 1 + j % 2, "1", 5, samples, greedy, 0.0))
    return out


def test_tune_spends_nothing_on_easy_prompts_and_searches_on_hard_ones(tmp_path):
    pools = _pools()
    policy, tables = tune.tune(pools, model="m", self_eval="s", prune_points=(16, 32), temperature=0.7,
                               budgets=(4, 8))
    assert policy.budgets[8][0].strategy == PROBE  # easy bin: the probe was right and confident
    assert policy.budgets[8][4].strategy != PROBE  # hard bin: sample more
    path = tmp_path / "p.json"
    path.write_text(policy.dumps())
    again = Policy.load(path)
    assert again == policy
    got = tune.apply(again, pools, 8, (16, 32))
    assert got.correct.mean() == 1.0  # easy: the probe; hard: the best-scored sample is right
    assert got.tokens[got.bins == 1].mean() == 10  # the probe alone
    assert got.selfeval_tokens[got.bins == 1].mean() == 4  # scoring it


def test_tune_refuses_too_few_prompts():
    with pytest.raises(UsageError, match="at least 10 prompts"):
        tune.tune(_pools(6), model="m", self_eval="s", prune_points=(16, 32), temperature=0.7)


def test_pool_cannot_replay_beam():
    with pytest.raises(UsageError, match="cannot be replayed"):
        tune.replay_choice(PolicyChoice(strategy="beam", options={"budget": 4}), _pools(), (16, 32))


def test_budgets_stay_within_what_the_pool_can_replay(tmp_path):
    from edge_adapt.errors import validated
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune_run import TuneConfig

    pool = EvalConfig(k=4, n_prompts=20, split="validation", cache_dir=tmp_path)  # never tuned on test
    assert TuneConfig(pool=pool).budgets == [2, 4]  # the defaults a pool of 4 samples (+ the probe) can spend
    assert TuneConfig(pool=pool, budgets=[3, 5]).budgets == [3, 5]
    with pytest.raises(UsageError, match="budget 8 spends the probe and 7 more samples, more than the pool's 4"):
        validated(TuneConfig, {"pool": pool, "budgets": [2, 8]}, "tune-policy")


def test_live_auto_below_the_smallest_tuned_budget_is_refused_before_sampling(tmp_path):
    """Was: both pools sampled, then "budget 8 is too small for this policy" and no policy written."""
    from edge_adapt.errors import validated
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune_run import TuneConfig

    pool = EvalConfig(k=16, n_prompts=20, split="validation", cache_dir=tmp_path)
    fields = {"pool": pool, "budgets": [12], "test_split": "test", "live": ["auto"]}
    with pytest.raises(UsageError, match="--live-budget 8 is below the smallest tuned budget 12"):
        validated(TuneConfig, fields, "tune-policy")
    assert validated(TuneConfig, {**fields, "live_budget": 12}, "tune-policy").live_budget == 12
    assert validated(TuneConfig, {**fields, "live": ["best-of-n"]}, "tune-policy").live == ["best-of-n"]


@pytest.mark.parametrize("name", ["prune", "adaptive+prune"])
def test_live_pruning_prunes_at_the_pools_prune_points(tmp_path, name):
    """Was: the strategy's default prune point 32, refused for --max-tokens 16 although --prune-at 8 was given."""
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune_run import TuneConfig, live_config

    pool = EvalConfig(k=2, n_prompts=10, split="validation", max_tokens=16, prune_points=[8], cache_dir=tmp_path)
    cfg = TuneConfig(pool=pool, test_split="test", live=[name])
    test = pool.model_copy(update={"split": "test", "n_prompts": 2})
    got = live_config(cfg, test, name, tmp_path / "p.json")
    assert got.prune_at == (8,) and got.max_tokens == 16
    # No prune point below the reply budget (the defaults 16 and 32 are not below 16): said before sampling.
    bare = EvalConfig(k=2, n_prompts=2, split="test", max_tokens=16, cache_dir=tmp_path)
    with pytest.raises(UsageError, match=rf"--live {re.escape(name)} prunes at the pool's prune points, and none is below max_tokens 16: give --prune-at"):
        live_config(cfg, bare, name, tmp_path / "p.json")


def test_a_suite_file_of_too_few_problems_is_refused_before_sampling(tmp_path, monkeypatch):
    """Was: --prompts 150 passed the early check, the 3-problem suite was sampled whole, then refused."""
    import json

    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval import tune_run

    suite = tmp_path / "three.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(3)))

    def sampled(*args, **kwargs):
        raise AssertionError("the pool was sampled")

    monkeypatch.setattr(tune_run, "pool_backend", sampled)
    pool = EvalConfig(suite=str(suite), k=2, n_prompts=150, split="validation", cache_dir=tmp_path / "c")
    cfg = tune_run.TuneConfig(pool=pool, out=tmp_path / "p.json")
    with pytest.raises(UsageError, match="tuning needs at least 10 prompts, and suite '.*three.jsonl' holds 3"):
        tune_run.run_tune(cfg)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("given", "message"), [
    ({"test_prompts": 5}, "--test-prompts is read only with --test-split"),
    ({"test_split": "test", "live_prompts": 3}, "--live-prompts is read only with --live"),
    ({"test_split": "test", "live_budget": 4}, "--live-budget is read only with --live"),
])
def test_a_setting_without_the_option_it_serves_is_refused(tmp_path, given, message):
    """Was: accepted and ignored in silence (a test pool's size with no test split, a live budget with nothing
    run live), as a backend setting without --backend is refused."""
    from edge_adapt.errors import validated
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune_run import TuneConfig

    pool = EvalConfig(k=4, n_prompts=20, split="validation", cache_dir=tmp_path)
    with pytest.raises(UsageError, match=f"^tune-policy: {message}$"):
        validated(TuneConfig, {"pool": pool, **given}, "tune-policy")


def test_tune_policy_without_report_prints_the_held_out_comparison(tmp_path):
    """Was: --test-split sampled and replayed the test pool, then showed nothing of it without --report."""
    from typer.testing import CliRunner

    from edge_adapt.cli import app

    result = CliRunner().invoke(app, ["tune-policy", "-o", str(tmp_path / "p.json"), "--prompts", "10", "-k", "2",
                                      "--max-tokens", "16", "--budget", "2", "--test-split", "test",
                                      "--test-prompts", "3", "--threads", "1", "--cache", str(tmp_path / "cache"),
                                      "--live", "auto", "--live-prompts", "1"])
    assert result.exit_code == 0, result.output
    assert "- test: 3 prompts the tuning never saw" in result.output
    assert re.search(r"^\| 2 \| \d\.\d{3} \(", result.output, re.M), result.output  # auto's row at budget 2
    # Live auto runs with the policy just tuned, scored as it was tuned; the policy's only row is budget 2, so
    # its live row says 2, not the --live-budget of 8 asked (was: "| auto | 8 |" for runs of at most 2 samples).
    assert re.search(r"^\| auto \| 2 \| 1 \| ", result.output, re.M), result.output


@pytest.mark.parametrize("params, heading", [(3_219_776, "with another model"), (360_000_000, "with a larger model")])
def test_the_report_calls_the_compared_model_larger_only_when_it_is(params, heading):
    """Was: "comparison with a larger model" above a 3M-parameter model compared with the 134.5M one tuned."""
    from edge_adapt.eval.tune_run import markdown

    ref = {"name": "best-of-2", "accuracy": 0.5, "ci": [0.1, 0.9], "tokens": 20.0}
    report = {"policy": "p.json", "tuning": {"source": "arith validation", "tolerance": 0.02, "cross_validation": {}},
              "bin_edges": [0.1, 0.2, 0.3, 0.4],
              "test": {"prompts": 2, "greedy": 0.5, "greedy_tokens": 10.0, "reference": ref, "budgets": {},
                       "params": 134_515_008, "prompt_tokens": 30.0},
              "compare": {"model": "other.gguf", "fingerprint": "llama:x", "params": params, "prompts": 2,
                          "accuracy": 0.0, "ci": [0.0, 0.8], "tokens": 9.0, "flops": 1e9}}
    assert f"## Compute-matched comparison {heading}\n" in markdown(report)
