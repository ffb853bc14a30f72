"""Replay over tiny hand-made pools equals brute-force recomputation; metrics match known values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edge_adapt.eval import metrics
from edge_adapt.eval import replay as rp
from edge_adapt.eval.pool import PoolSample, PromptPool


def _s(i, correct, end, mlp=-1.0, n_tok=10, scores=(None,), ans=None, cost=5.0):
    return PoolSample(index=i, temperature=0.7, seed=i, text="", n_tokens=n_tok, logprobs=(mlp,) * n_tok, finish="eos",
                      scores=tuple(scores), end_score=end, selfeval_tokens=(cost,) * len(scores) + (cost,),
                      extracted=ans if ans is not None else ("right" if correct else f"w{i}"), correct=correct)


def _pool(samples, greedy_ok=False, pid="p"):
    return PromptPool("k-" + pid, pid, 1, "1", 20, tuple(samples), _s(-1, greedy_ok, 0.5), 0.0)


def _pools():
    rng = np.random.default_rng(3)
    out = []
    for j in range(6):
        samples = []
        for i in range(5):
            end = float(np.round(rng.random(), 1))  # coarse: ties on purpose
            samples.append(_s(i, bool(rng.random() < 0.4), end, mlp=float(-rng.random()), n_tok=int(rng.integers(4, 30)),
                              scores=(float(rng.random()),), ans=str(int(rng.integers(0, 3)))))
        # answers decide correctness in the vote: make "0" the right one
        samples = [s.__class__(**{**s.__dict__, "correct": s.extracted == "0"}) for s in samples]
        out.append(_pool(samples, pid=str(j)))
    return out


def _best(group, by):
    if by == "oracle":
        return float(any(s.correct for s in group))
    key = (lambda s: (s.end_score, s.mean_logprob)) if by == "self-eval" else (lambda s: s.mean_logprob)
    return float(max(group, key=key).correct)  # max() keeps the first of equals: the lowest index, as replay does


@pytest.mark.parametrize("by", ["self-eval", "logprob", "oracle"])
def test_best_of_n_replay_equals_brute_force(by):
    pools = _pools()
    for n in range(1, 6):
        r = rp.best_of_n(pools, n, by)
        for p, got in zip(pools, r.correct):
            subs = list(itertools.combinations(p.samples, n))
            assert got == pytest.approx(np.mean([_best(list(g), by) for g in subs]))
        assert r.mean_samples == n
        assert r.mean_tokens == pytest.approx(np.mean([n * np.mean([s.n_tokens for s in p.samples]) for p in pools]))


def test_best_of_n_breaks_self_eval_ties_by_mean_logprob():
    p = _pool([_s(0, False, 0.9, mlp=-2.0), _s(1, True, 0.9, mlp=-0.5), _s(2, False, 0.1, mlp=-0.1)])
    assert rp.best_of_n([p], 3, "self-eval").correct == (1.0,)
    assert rp.best_of_n([p], 3, "logprob").correct == (0.0,)


def test_vote_replay_equals_brute_force():
    pools = _pools()
    for n in (2, 3):
        for weighted in (False, True):
            r = rp.vote(pools, n, weighted=weighted, draws=1000)  # C(5, n) <= draws: exact
            for p, got in zip(pools, r.correct):
                want = []
                for g in itertools.combinations(p.samples, n):
                    w = {}
                    for s in g:
                        w[s.extracted] = w.get(s.extracted, 0) + (s.end_score if weighted else 1)
                    win = max(w, key=lambda a: (w[a], max(s.end_score for s in g if s.extracted == a)))
                    want.append(float(win == "0"))
                assert got == pytest.approx(np.mean(want))


def test_adaptive_stops_at_threshold_and_respects_budget():
    p = _pool([_s(i, i == 0, 0.95 if i == 0 else 0.2, n_tok=10) for i in range(8)])
    never = rp.adaptive([p], threshold=1.01, budget=8, draws=16)
    assert never.mean_samples == 8 and never.accuracy == 1.0 and never.mean_tokens == 80
    always = rp.adaptive([p], threshold=0.0, budget=8, draws=16)
    assert always.mean_samples == 1 and always.mean_tokens == 10
    # With threshold 0.9 it stops exactly when the one good sample has been drawn: expectation over orders.
    mid = rp.adaptive([p], threshold=0.9, budget=8, draws=4000, seed=1)
    assert mid.accuracy == 1.0
    cum = [1, 2, 4, 8]
    exp_samples = sum(next(c for c in cum if c > pos) for pos in range(8)) / 8
    assert mid.mean_samples == pytest.approx(exp_samples, rel=0.05)


def test_adaptive_from_greedy_stops_on_a_confident_greedy_and_counts_it_in_the_budget():
    samples = [_s(i, i == 0, 0.95 if i == 0 else 0.2, n_tok=10) for i in range(8)]
    sure = PromptPool("k", "p", 1, "1", 20, tuple(samples), _s(-1, True, 0.99, n_tok=3), 0.0)
    got = rp.adaptive([sure], threshold=0.9, budget=8, draws=16, greedy_first=True)
    assert got.accuracy == 1.0 and got.mean_samples == 1 and got.mean_tokens == 3
    assert got.setting.endswith("first=greedy")
    # An unsure wrong greedy: the later rounds draw from the samples; the budget includes the greedy one,
    # so one of the 8 samples is never drawn, and the right one is found in 7 of 8 orders.
    unsure = PromptPool("k", "p", 1, "1", 20, tuple(samples), _s(-1, False, 0.3, n_tok=3), 0.0)
    got = rp.adaptive([unsure], threshold=1.01, budget=8, draws=4000, seed=2, greedy_first=True)
    assert got.mean_samples == 8 and got.mean_tokens == 3 + 7 * 10
    assert got.accuracy == pytest.approx(7 / 8, abs=0.03)


def test_adaptive_with_a_perfect_judge_stops_at_the_first_right_sample():
    samples = [_s(i, i == 0, 0.1, n_tok=10) for i in range(8)]
    wrong_greedy = PromptPool("k", "p", 1, "1", 20, tuple(samples), _s(-1, False, 0.99, n_tok=3), 0.0)
    # Budget 2: the greedy answer is wrong, so one sample is always drawn; it is the right one in 1 of 8 orders.
    got = rp.adaptive([wrong_greedy], threshold=0.0, budget=2, draws=4000, seed=4, greedy_first=True, by="oracle")
    assert got.setting == "by=oracle max=2 first=greedy"
    assert got.mean_samples == 2 and got.mean_selfeval_tokens == 0
    assert got.accuracy == pytest.approx(1 / 8, abs=0.02)
    # Budget 8: the judge keeps drawing until the right sample, found unless it is the one of 8 left undrawn.
    got = rp.adaptive([wrong_greedy], threshold=0.0, budget=8, draws=4000, seed=4, greedy_first=True, by="oracle")
    assert got.accuracy == pytest.approx(7 / 8, abs=0.02)
    right_greedy = PromptPool("k", "p", 1, "1", 20, tuple(samples), _s(-1, True, 0.01, n_tok=3), 0.0)
    got = rp.adaptive([right_greedy], threshold=0.0, budget=8, draws=16, greedy_first=True, by="oracle")
    assert got.accuracy == 1 and got.mean_samples == 1 and got.mean_tokens == 3


def test_no_threshold_beats_the_perfect_judge_at_its_budget():
    pools = _pools()
    for budget in (2, 3, 5):
        judge = rp.adaptive(pools, 0.0, budget, seed=7, by="oracle")
        for t in (0.0, 0.3, 0.6, 0.9, 1.01):
            score = rp.adaptive(pools, t, budget, seed=7)  # same seed: the same orders as the judge's
            assert all(c <= j for c, j in zip(score.correct, judge.correct))


def test_thresholds_from_greedy_reach_the_low_sample_end():
    # Sample scores all sit above the greedy ones: the sample-score thresholds would stop every prompt at its
    # greedy answer or none, so the from-greedy sweep adds the greedy scores' quartiles.
    pools = [PromptPool(f"k{j}", "p", 1, "1", 20, tuple(_s(i, i == 0, 0.8, n_tok=10) for i in range(8)),
                        _s(-1, j % 2 == 0, 0.05 + 0.1 * j, n_tok=3), 0.0) for j in range(8)]
    assert len(rp.default_thresholds(pools, greedy_first=True)) == len(rp.default_thresholds(pools)) + 3
    median = sorted(p.greedy.end_score for p in pools)[3:5]
    t = round(float(np.quantile([p.greedy.end_score for p in pools], 0.5)), 4)
    assert median[0] < t < median[1] and t in rp.default_thresholds(pools, greedy_first=True)
    got = rp.adaptive(pools, t, budget=8, draws=16, greedy_first=True)
    assert got.mean_samples == pytest.approx((4 * 1 + 4 * 2) / 8)  # half stop at greedy; a sample of 0.8 stops the rest


def test_prune_keeps_top_k_by_score_at_the_prune_point():
    # Sample 0 looks best at the prune point but ends badly; 1 and 2 survive a keep-2 cut; 3 is pruned.
    s = [_s(0, False, 0.1, scores=(0.9,), n_tok=40), _s(1, True, 0.8, scores=(0.7,), n_tok=30),
         _s(2, False, 0.6, scores=(0.5,), n_tok=20), _s(3, True, 0.99, scores=(0.1,), n_tok=50)]
    # Keep 2: samples 0 and 1 survive (0.9, 0.7 at the point); the best end score among them is 1's (0.8).
    assert rp.prune([_pool(s)], points=(16,), n=4, keeps=(2,)).correct == (1.0,)
    # Keep 1: only sample 0 survives, though it ends worst; sample 3 (best at the end) was pruned.
    assert rp.prune([_pool(s)], points=(16,), n=4, keeps=(1,)).correct == (0.0,)


def test_prune_accounting_matches_hand_computation():
    s = [_s(0, False, 0.1, scores=(0.9,), n_tok=40, cost=5), _s(1, True, 0.8, scores=(0.7,), n_tok=30, cost=5),
         _s(2, False, 0.6, scores=(0.5,), n_tok=20, cost=5), _s(3, True, 0.99, scores=(None,), n_tok=10, cost=5)]
    r = rp.prune([_pool(s)], points=(16,), n=4, keeps=(2,))
    # At 16 tokens all four are scored (4 x 5 self-eval tokens): 0, 1, 2 are still generating; 3 finished at 10
    # tokens and is scored on its final text, so it competes with its end score 0.99. Kept: 3 (0.99) and 0 (0.9).
    # Pruned: 1 and 2 at 16 tokens each. At the end only 0 is scored again (3's text has not changed).
    assert r.correct == (1.0,)
    assert r.tokens == (10 + 40 + 16 + 16,)
    assert r.selfeval_tokens == (4 * 5 + 1 * 5,)
    assert rp.prune_schedule(16, 2, 0.5) == (8, 4) and rp.prune_schedule(4, 3, 0.25) == (1, 1, 1)


def _recorded(lengths, table, points, max_tokens, cost, chosen):
    """The pool eval records for FakeEngine samples of lengths[i] words (+ EOS), scored p_keep = table[i, tokens]."""
    out = []
    for i, length in enumerate(lengths):
        n = min(length + 1, max_tokens)
        at = tuple(None if n <= p else float(table[i, p]) for p in points)  # finished by the point: not scored there
        out.append(PoolSample(index=i, temperature=0.7, seed=i, text="", n_tokens=n, logprobs=(-1.0,) * n,
                              finish="eos" if n == length + 1 else "length", scores=at, end_score=float(table[i, n]),
                              selfeval_tokens=tuple(0.0 if x is None else cost for x in at) + (cost,),
                              extracted=None, correct=i == chosen))
    return out


PRUNE_CASES = [
    # (words per sample, prune points, keep, max tokens): the QA case, three done before the point, one going on
    ((11, 27, 19, 40), (32,), 1, 48),
    ((2, 4, 5, 30), (8,), 1, 40),
    ((2, 4, 5, 30), (8,), 2, 40),
    ((2, 5, 6, 9, 12, 20), (4, 8), 2, 24),  # some finish between the points, some survive both
    ((1, 1, 2, 3), (4, 8), 3, 12),  # all done before the first point
]


@pytest.mark.parametrize("case", [*PRUNE_CASES, *range(12)])
def test_prune_replay_spends_what_the_live_strategy_spends(case):
    """The live prune strategy on a scripted engine and the replay of the pool eval would record from the same
    samples: the same answer, generated tokens and self-eval tokens (a sample that had finished before a prune
    point is scored there too, once)."""
    from test_strategies import FakeScorer, chosen, fresh, run, usage

    rng = np.random.default_rng(case if isinstance(case, int) else 0)
    if isinstance(case, int):  # seeded random scripts and schedules
        n_points = int(rng.integers(1, 4))
        points = tuple(sorted(rng.choice(np.arange(2, 20), n_points, replace=False).tolist()))
        lengths = tuple(int(x) for x in rng.integers(0, 30, int(rng.integers(2, 9))))
        case = (lengths, points, int(rng.integers(1, len(lengths))), 24)
    lengths, points, keep, max_tokens = case
    table = rng.random((len(lengths), max_tokens + 1))  # distinct scores: no ties to break
    ev = run(fresh(lambda i: ["w"] * lengths[i]), FakeScorer(lambda i, n: float(table[i, n]), suffix_len=5),
             strategy="prune", budget=len(lengths), k=keep, prune_at=points, max_tokens=max_tokens)
    live = usage(ev)
    pool = _pool(_recorded(lengths, table, points, max_tokens, 5.0, chosen(ev).sample))
    r = rp.prune([pool], points, len(lengths), [keep] * len(points))
    assert r.correct == (1.0,)  # the replay answers with the sample the live run chose
    assert r.tokens == (live.generated_tokens,)
    assert r.selfeval_tokens == (live.selfeval_tokens,)


def test_greedy_replay_reads_the_greedy_sample():
    p = _pool([_s(0, False, 0.5)], greedy_ok=True)
    g = rp.greedy([p])
    assert g.correct == (1.0,) and g.mean_samples == 1


def test_replay_all_runs_on_a_pool():
    rows = rp.replay_all(_pools(), prune_points=(16,))
    names = {r.strategy for r in rows}
    assert {"greedy", "best-of-n", "majority-vote", "weighted-vote", "adaptive", "prune"} <= names
    assert all(0 <= r.accuracy <= 1 for r in rows)
    # From greedy, the sweep runs at budgets 2 and 4 too (K = 5 here), and no row spends more than its budget.
    budgets = {r.setting.split()[1] for r in rows if r.setting.endswith("first=greedy")}
    assert budgets == {"max=2", "max=4", "max=5"}
    capped = [r for r in rows if r.strategy == "adaptive" and "max=2 " in r.setting]
    assert capped and all(1 <= r.mean_samples <= 2 for r in capped)
    judged = [r.setting for r in rows if r.strategy == "adaptive" and r.setting.startswith("by=oracle")]
    assert judged == ["by=oracle max=2 first=greedy", "by=oracle max=4 first=greedy", "by=oracle max=5 first=greedy"]
    # N = 5, 2: halving and quartering N = 2 are the same schedule (2 -> 1), which is one row, not two.
    pruned = [r.setting for r in rows if r.strategy == "prune"]
    assert pruned == ["N=5 keep=2 at=16", "N=5 keep=1 at=16", "N=2 keep=1 at=16"]


def test_no_prune_row_starts_more_samples_than_the_pool_holds():
    """Was: K = 1 gave a "prune N=2 keep=1" row replayed on the one sample (it never pruned anything)."""
    one = [_pool([_s(0, True, 0.9, scores=(0.5,))], pid=str(j)) for j in range(3)]
    assert [r for r in rp.replay_all(one, prune_points=(16,)) if r.strategy == "prune"] == []
    two = [_pool([_s(0, True, 0.9, scores=(0.5,)), _s(1, False, 0.2, scores=(0.4,))], pid=str(j)) for j in range(3)]
    assert [r.setting for r in rp.replay_all(two, prune_points=(16,)) if r.strategy == "prune"] == ["N=2 keep=1 at=16"]
    with pytest.raises(ValueError, match="prune N=4 needs 4 samples per prompt; a pool holds 2"):
        rp.prune(two, (16,), 4, (1,))


def test_plots_draw_the_perfect_judge_as_one_curve_across_budgets():
    from edge_adapt.eval.plots import _curves
    from edge_adapt.eval.report import strategy_rows

    pools = _pools()
    curves = _curves(strategy_rows(rp.replay_all(pools, prune_points=(16,)), pools, 0), "mean_samples", 5)
    assert len(curves["adaptive by=oracle first=greedy"]) == 3  # budgets 2, 4 and K = 5
    assert [f for f in curves if "oracle" in f and f.startswith("adaptive")] == ["adaptive by=oracle first=greedy"]


def test_auroc_brier_ece_on_known_values():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert metrics.auroc(scores, labels) == pytest.approx(0.75)
    assert metrics.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # ties count half
    assert metrics.auroc([0.2, 0.3], [1, 1]) is None
    assert metrics.brier(scores, labels) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert metrics.brier_constant(labels) == pytest.approx(0.25)
    # Two bins: [0.1, 0.4, 0.35] -> bins 1, 4, 3 ; 0.8 -> bin 8. Bin accuracies vs mean scores:
    # bin1: |0 - 0.1|, bin3: |1 - 0.35|, bin4: |0 - 0.4|, bin8: |1 - 0.8|; each weight 1/4.
    assert metrics.ece(scores, labels) == pytest.approx((0.1 + 0.65 + 0.4 + 0.2) / 4)
    assert metrics.ece([0.3] * 10, [1] * 3 + [0] * 7) == pytest.approx(0.0)  # perfectly calibrated
    lo, hi = metrics.wilson(15, 30)
    assert lo == pytest.approx(0.3315, abs=1e-3) and hi == pytest.approx(0.6685, abs=1e-3)
    lo, hi = metrics.bootstrap_ci([1.0] * 10 + [0.0] * 10, seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.6
    assert math.isclose(metrics.bootstrap_ci([0.7] * 5)[0], 0.7)


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    s, y = rng.integers(0, 5, 60) / 4, rng.random(60) < 0.4  # few distinct values: many ties
    pos, neg = s[y], s[~y]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert metrics.auroc(s, y) == pytest.approx(pairwise)


def test_within_prompt_auroc_ranks_replies_to_one_prompt_only():
    # Easy prompt all right and high, hard prompt all wrong and low: pooled AUROC 1, but nothing to choose between.
    apart = [([0.9, 0.8], [1, 1]), ([0.2, 0.1], [0, 0])]
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert metrics.within_prompt_auroc(apart) is None
    # An easy prompt (three right, all high) and a hard one (three wrong, all low), and within each the wrong
    # reply above the right one: pooled AUROC 0.56, within-prompt 0.
    inverted = [([0.9, 0.9, 0.9, 0.95], [1, 1, 1, 0]), ([0.1, 0.1, 0.1, 0.05], [0, 0, 0, 1])]
    assert metrics.auroc([0.9, 0.9, 0.9, 0.95, 0.1, 0.1, 0.1, 0.05], [1, 1, 1, 0, 0, 0, 0, 1]) == pytest.approx(0.5625)
    assert metrics.within_prompt_auroc(inverted) == 0.0
    # Pairs, not prompts, are counted: 2 x 1 pairs right (one tie) and 1 x 1 pair wrong.
    mixed = [([0.6, 0.5, 0.5], [1, 1, 0]), ([0.3, 0.7], [1, 0]), ([0.4], [1])]
    assert metrics.within_prompt_auroc(mixed) == pytest.approx((1 + 0.5 + 0) / 3)


def test_auroc_ci_resamples_prompts():
    rng = np.random.default_rng(0)
    separated = [([0.9, 0.8, 0.2], [1, 1, 0]), ([0.7, 0.1], [1, 0]), ([0.3], [0])]
    assert metrics.auroc_ci(separated, n_boot=200) == (1.0, 1.0)
    # Scores unrelated to correctness: the interval holds 0.5, and narrows as prompts are added.
    def noise(n_prompts):
        return [(list(rng.random(8)), list(rng.random(8) < 0.5)) for _ in range(n_prompts)]
    lo, hi = metrics.auroc_ci(noise(20), n_boot=300)
    assert lo < 0.5 < hi
    lo2, hi2 = metrics.auroc_ci(noise(320), n_boot=300)
    assert hi2 - lo2 < (hi - lo) / 2
    # Replies to one prompt move together: one prompt all right and high, one all wrong and low gives AUROC 1
    # from the pair, but a resample of one prompt has one class only and is left out, never counted as 0.5.
    assert metrics.auroc_ci([([0.9] * 8, [1] * 8), ([0.1] * 8, [0] * 8)], n_boot=200) == (1.0, 1.0)
    assert metrics.auroc_ci([([0.9], [1])], n_boot=50) is None


def test_perfect_judge_at_the_same_samples_grows_in_proportion_to_the_extra_samples():
    from edge_adapt.eval.report import judge_at

    def row(strategy, setting, correct, samples, budget=2):
        return rp.Replay(strategy, setting, tuple(correct), tuple(samples), (0.0,) * 4, (0.0,) * 4, budget)

    # Greedy is wrong on prompts 0 and 1; one more sample fixes prompt 0 only. The judge resamples both.
    greedy = row("greedy", "", [0, 0, 1, 1], [1, 1, 1, 1], 1)
    judge = row("adaptive", "by=oracle max=2 first=greedy", [1, 0, 1, 1], [2, 2, 1, 1])
    score = row("adaptive", "threshold=0.3 max=2 first=greedy", [1, 0, 1, 1], [2, 1, 1, 1])  # 1.25 samples
    replays = [greedy, judge, score]
    assert judge_at(score, replays) == pytest.approx(0.5 + 0.5 * 0.25)  # half the judge's extra samples
    spendthrift = row("adaptive", "threshold=0.9 max=2 first=greedy", [1, 0, 1, 1], [2, 2, 2, 2])
    assert judge_at(spendthrift, replays) == pytest.approx(0.75)  # no more than the judge's own row
    assert judge_at(row("adaptive", "threshold=0.3 max=2", [1, 0, 1, 1], [2, 1, 1, 1]), replays) is None
    assert judge_at(judge, replays) is None
    assert judge_at(row("adaptive", "threshold=0.3 max=4 first=greedy", [1, 0, 1, 1], [2, 1, 1, 1], 4), replays) is None


def test_report_rows_carry_the_judges_share_for_adaptive_from_greedy_only():
    from edge_adapt.eval.report import strategy_rows

    pools = _pools()
    rows = strategy_rows(rp.replay_all(pools, prune_points=(16,)), pools, 0)
    judged = [r for r in rows if r.judge_accuracy is not None]
    assert judged and all(r.setting.endswith("first=greedy") and "oracle" not in r.setting for r in judged)
    greedy = next(r.accuracy for r in rows if r.strategy == "greedy")
    for r in judged:
        assert greedy <= r.judge_accuracy <= max(x.accuracy for x in rows if x.setting.startswith("by=oracle"))
        if r.judge_gain_share is not None:
            assert r.judge_gain_share == pytest.approx((r.accuracy - greedy) / (r.judge_accuracy - greedy))
