"""Strategies against a scripted fake engine and fake scorer: pure mechanics, no model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence as Seq
from contextlib import contextmanager

import json
from pathlib import Path

import numpy as np
import pytest

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Cancelled, Done, Finished, SampleStarted, Token
from edge_adapt.engine.steps import Decode
from edge_adapt.engine.text import TextStream
from edge_adapt.errors import BudgetError, UsageError
from edge_adapt.strategies import (
    STRATEGIES, Chosen, Pruned, RoundStarted, Scored, StrategyConfig, exact_text, last_number, make_extractor,
    round_sizes, run_strategy, samples_at_once, tally, temperatures,
)

EOS = 0


class FakeEngine:
    """Scripted generation: sample i emits the words of `script(i)` one token each, then EOS.

    Each token's log-probability is `logprob(i)`. One 'decode call' per step, like the real engine. It
    refuses to release a sequence id twice and counts ids in use, so leaks and double frees fail tests.
    """

    def __init__(
        self,
        script: Callable[[int], list[str]],
        *,
        parallel: int = 32,
        logprob: Callable[[int], float] = lambda i: -1.0,
        n_ctx_seq: int = 4096,
    ) -> None:
        self.script, self.logprob = script, logprob
        self.n_ctx_seq = n_ctx_seq
        self._free = list(range(parallel))
        self.parallel = parallel
        self.peak = 0  # the most sequences held at once
        self.decode_calls = 0
        self.extended = 0
        self.started: list[Sample] = []
        self.branched: list[Sample] = []
        self.contexts: list[list[int]] = []  # each started sample's prompt tokens
        self.fingerprint = "fake"

    @property
    def free_sequences(self) -> int:
        return len(self._free)

    def _take(self) -> int:
        if not self._free:
            raise BudgetError("no free sequence")
        self.peak = max(self.peak, self.parallel - len(self._free) + 1)
        return self._free.pop(0)

    def open(self, tokens: Seq[int]) -> Sequence:
        self.decode_calls += 1
        return Sequence(self._take(), list(tokens), len(tokens), np.zeros(4, np.float32))

    def start(self, root, params, *, max_tokens, stop=(), first_index=0, consume_root=False) -> list[Sample]:
        forks = len(params) - consume_root
        if forks > self.free_sequences:
            raise BudgetError("not enough sequences")
        seqs = [Sequence(self._take(), list(root.tokens), len(root.tokens), root.logits) for _ in range(forks)]
        new = [
            Sample(first_index + i, seq, p, max_tokens, TextStream(tuple(stop)), np.random.default_rng(p.seed))
            for i, (seq, p) in enumerate(zip(seqs + ([root] if consume_root else []), params))
        ]
        self.started.extend(new)
        self.contexts.extend(list(root.tokens) for _ in new)
        return new

    def branch(self, parent, params, *, first_index=0) -> list[Sample]:
        assert parent.finish is None
        if len(params) > self.free_sequences:
            raise BudgetError("not enough sequences")
        new = [
            Sample(first_index + i, Sequence(self._take(), list(parent.seq.tokens), parent.seq.n_past, parent.seq.logits),
                   p, parent.max_tokens, parent.stream.copy(), np.random.default_rng(p.seed),
                   list(parent.generated), list(parent.logprobs))
            for i, p in enumerate(params)
        ]
        self.branched.extend(new)
        return new

    def extend(self, updates) -> None:
        self.decode_calls += 1
        for seq, new in updates:
            seq.tokens.extend(new)
            seq.n_past = len(seq.tokens)
            self.extended += len(new)

    def truncate(self, seq: Sequence, n: int) -> None:
        del seq.tokens[n:]
        seq.n_past = min(seq.n_past, n)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def chat_prompt(self, messages) -> str:
        return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"

    @contextmanager
    def adapter(self, adapter, scale: float = 1.0) -> Iterator[None]:
        yield

    def steps(self, samples: Seq[Sample], until: int | None = None, *, max_new=None, pause_on=None) -> Iterator:
        limit = {s.index: min(s.max_tokens, until or s.max_tokens,
                              len(s.generated) + max_new if max_new else s.max_tokens) for s in samples}
        live = [s for s in samples if s.finish is None and len(s.generated) < limit[s.index]]
        paused = set()
        while live:
            self.decode_calls += 1
            for s in live:
                words = self.script(s.index)
                lp = self.logprob(s.index)
                n = len(s.generated)
                s.logprobs.append(lp)
                if n >= len(words):
                    s.generated.append(EOS)
                    s.finish = "eos"
                    yield Token(s.index, EOS, "", lp)
                    yield Finished(s.index, "eos", s.text, len(s.generated), s.sum_logprob)
                    continue
                tok = 1000 + 100 * s.index + n
                s.generated.append(tok)
                s.seq.tokens.append(tok)
                s.seq.n_past += 1
                text, _ = s.stream.push((words[n] + " ").encode())
                if len(s.generated) >= s.max_tokens:
                    s.finish = "length"
                yield Token(s.index, tok, text, lp)
                if s.finish:
                    yield Finished(s.index, s.finish, s.text, len(s.generated), s.sum_logprob)
                elif pause_on and pause_on in text:
                    paused.add(s.index)
            live = [s for s in live if s.finish is None and len(s.generated) < limit[s.index] and s.index not in paused]

    def release(self, seq: Sequence) -> None:
        assert seq.id not in self._free, f"sequence {seq.id} released twice"
        self._free.append(seq.id)

    @contextmanager
    def opened(self, tokens: Seq[int]) -> Iterator[Sequence]:
        root = self.open(tokens)
        try:
            yield root
        finally:
            self.release(root)


class FakeScorer:
    """p_keep = fn(sample index, generated tokens so far); counts `suffix_len` tokens per sample scored."""

    def __init__(self, fn: Callable[[int, int], float], suffix_len: int = 5) -> None:
        self.fn = fn
        self.suffix = [7] * suffix_len
        self.decoded_tokens = 0
        self.calls: list[list[tuple[int, int]]] = []

    def steps(self, samples: Seq[Sample]) -> Iterator:
        """A scoring step program that decodes nothing (a real scorer yields its suffix decodes)."""
        self.calls.append([(s.index, len(s.generated)) for s in samples])
        self.decoded_tokens += len(samples) * len(self.suffix)
        return [self.fn(s.index, len(s.generated)) for s in samples]
        yield


def words(n: int) -> Callable[[int], list[str]]:
    return lambda i: [f"w{i}"] * n


def run(engine: FakeEngine, scorer: FakeScorer | None, **cfg) -> list:
    return list(run_strategy(engine, [1, 2, 3], StrategyConfig(**cfg), scorer))


def chosen(events: list) -> Chosen:
    return next(e for e in events if isinstance(e, Chosen))


def usage(events: list):
    assert isinstance(events[-1], Done)
    return events[-1].usage


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def fresh(script=words(10), parallel: int = 32, **kw) -> FakeEngine:
    return FakeEngine(script, parallel=parallel, **kw)


# -- single / best-of-n -----------------------------------------------------------------------------------
def test_single_runs_one_sample_and_scores_only_with_a_scorer():
    e = fresh()
    ev = run(e, None, strategy="single", temperature=0)
    assert len(of(ev, SampleStarted)) == 1 and of(ev, SampleStarted)[0].temperature == 0
    assert not of(ev, Scored) and chosen(ev).p_keep is None
    assert chosen(ev).text == "w0 " * 10
    ev = run(fresh(), FakeScorer(lambda i, n: 0.3), strategy="single")
    assert [s.p_keep for s in of(ev, Scored)] == [0.3]


def test_best_of_n_picks_highest_p_keep():
    scores = [0.2, 0.9, 0.5, 0.7]
    ev = run(fresh(), FakeScorer(lambda i, n: scores[i]), strategy="best-of-n", budget=4)
    assert chosen(ev).sample == 1 and chosen(ev).p_keep == 0.9
    assert len(of(ev, Scored)) == 4 and all(s.final for s in of(ev, Scored))


def test_best_of_n_ties_broken_by_mean_logprob():
    lps = [-2.0, -1.5, -0.5, -1.0]
    e = fresh(logprob=lambda i: lps[i])
    ev = run(e, FakeScorer(lambda i, n: 0.8 if i != 2 else 0.1), strategy="best-of-n", budget=4)
    assert chosen(ev).sample == 3  # 2 has the best log-probability but a lower score


def test_best_of_n_scores_all_samples_in_one_batch():
    sc = FakeScorer(lambda i, n: 0.5)
    run(fresh(), sc, strategy="best-of-n", budget=6)
    assert len(sc.calls) == 1 and len(sc.calls[0]) == 6


# -- adaptive ---------------------------------------------------------------------------------------------
def test_round_sizes_double_after_two_singles():
    assert round_sizes(16) == [1, 1, 2, 4, 8]
    assert round_sizes(10) == [1, 1, 2, 4, 2]
    assert round_sizes(1) == [1]


def test_adaptive_stops_when_threshold_met():
    sc = FakeScorer(lambda i, n: 0.95 if i == 3 else 0.1)  # sample 3 is the second of round 2 (1, 1, 2)
    ev = run(fresh(), sc, strategy="adaptive", budget=16, threshold=0.9)
    assert [r.n for r in of(ev, RoundStarted)] == [1, 1, 2]
    assert usage(ev).samples_started == 4
    assert chosen(ev).sample == 3


def test_adaptive_spends_budget_and_returns_best_seen_when_threshold_never_met():
    scores = {i: 0.1 + 0.01 * i for i in range(16)}
    scores[5] = 0.8
    ev = run(fresh(), FakeScorer(lambda i, n: scores[i]), strategy="adaptive", budget=16, threshold=0.9)
    assert [r.n for r in of(ev, RoundStarted)] == [1, 1, 2, 4, 8]
    assert usage(ev).samples_started == 16 and chosen(ev).sample == 5


def test_adaptive_threshold_zero_stops_after_first_sample():
    ev = run(fresh(), FakeScorer(lambda i, n: 0.0), strategy="adaptive", budget=16, threshold=0.0)
    assert usage(ev).samples_started == 1


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("linear", [0.1, 0.325, 0.55, 0.775, 1.0]),
        ("exponential", [0.1 * 10 ** (r / 4) for r in range(5)]),
        ("constant", [0.7] * 5),
    ],
)
def test_annealing_yields_scheduled_temperatures(schedule, expected):
    ev = run(fresh(), FakeScorer(lambda i, n: 0.0), strategy="adaptive", budget=16, threshold=1.0,
             schedule=schedule, **({"temperature": 0.7} if schedule == "constant" else {"t_min": 0.1, "t_max": 1.0}))
    assert [r.temperature for r in of(ev, RoundStarted)] == pytest.approx(expected)
    per_sample = [s.temperature for s in of(ev, SampleStarted)]
    assert per_sample == pytest.approx([t for t, n in zip(expected, [1, 1, 2, 4, 8]) for _ in range(n)])


def test_temperatures_single_round_is_t_min():
    assert temperatures("linear", 1, 0.2, 1.0, 0.7) == [0.2]
    assert temperatures("exponential", 3, 0.25, 1.0, 0.7) == pytest.approx([0.25, 0.5, 1.0])


def test_adaptive_rounds_reuse_sequence_ids():
    e = fresh(parallel=9)  # 8 samples at most at once + the prompt
    ev = run(e, FakeScorer(lambda i, n: 0.0), strategy="adaptive", budget=16, threshold=1.0)
    assert usage(ev).samples_started == 16 and e.free_sequences == 9


# -- prune ------------------------------------------------------------------------------------------------
def prune_score(i: int, n: int) -> float:
    return ((i * 7 + n) % 16) / 16  # a different ranking at each prune point


def test_prune_keeps_exactly_top_k_at_each_point():
    sc = FakeScorer(prune_score)
    ev = run(fresh(words(100)), sc, strategy="prune", budget=16, k=4, prune_at=(8, 16), max_tokens=40)
    alive = set(range(16))
    for point in (8, 16):
        at = [(s.sample, s.p_keep) for s in of(ev, Scored) if s.n_tokens == point]
        assert {i for i, _ in at} == alive
        top = {i for i, _ in sorted(at, key=lambda x: -x[1])[:4]}
        pruned_here = {p.sample for p in of(ev, Pruned) if p.n_tokens == point}
        assert pruned_here == alive - top
        alive = top
    assert len(alive) == 4
    ended = {f.sample: f for f in of(ev, Finished)}
    assert all(ended[i].reason == "length" and ended[i].n_tokens == 40 for i in alive)
    assert all(ended[i].reason == "pruned" for i in set(range(16)) - alive)
    assert chosen(ev).sample in alive


def test_prune_generates_only_what_survivors_need():
    ev = run(fresh(words(200)), FakeScorer(prune_score), strategy="prune", budget=16, k=4, prune_at=(32,), max_tokens=128)
    assert usage(ev).generated_tokens == 16 * 32 + 4 * (128 - 32)
    assert usage(ev).samples_pruned == 12


def test_prune_threshold_keeps_those_above_and_at_least_one():
    ev = run(fresh(words(100)), FakeScorer(lambda i, n: 0.9 if i in (2, 5, 7) else 0.1), strategy="prune",
             budget=8, prune_threshold=0.5, prune_at=(4,), max_tokens=10)
    assert {p.sample for p in of(ev, Pruned)} == set(range(8)) - {2, 5, 7}
    ev = run(fresh(words(100)), FakeScorer(lambda i, n: i / 100), strategy="prune",
             budget=8, prune_threshold=0.5, prune_at=(4,), max_tokens=10)
    assert len(of(ev, Pruned)) == 7 and chosen(ev).sample == 7


def test_prune_does_not_rescore_finished_samples():
    script = lambda i: ["x"] * (3 if i == 0 else 100)  # sample 0 ends before the first point
    sc = FakeScorer(lambda i, n: 1.0 if i == 0 else 0.5)
    ev = run(fresh(script), sc, strategy="prune", budget=4, k=2, prune_at=(8, 16), max_tokens=24)
    assert [s.n_tokens for s in of(ev, Scored) if s.sample == 0] == [4]  # 3 words + EOS, scored once
    assert chosen(ev).sample == 0


def test_adaptive_prune_prunes_inside_rounds():
    ev = run(fresh(words(100)), FakeScorer(prune_score), strategy="adaptive+prune", budget=16, threshold=1.0,
             k=2, prune_at=(8,), max_tokens=20)
    assert usage(ev).samples_started == 16
    # rounds of 1, 1, 2 are not pruned with k=2; rounds of 4 and 8 keep 2 each
    assert usage(ev).samples_pruned == 2 + 6
    assert usage(ev).generated_tokens == 4 * 20 + 12 * 8 + 4 * 12


# -- votes ------------------------------------------------------------------------------------------------
def test_vote_counts_majority():
    answers = ["7", "7", "8", "7", "8", "nothing"]
    ev = run(fresh(lambda i: ["answer", answers[i]]), None, strategy="vote", budget=6)
    c = chosen(ev)
    assert c.answer == "7" and c.votes == 3 and dict(c.tally) == {"7": 3, "8": 2}
    assert not of(ev, Scored)


def test_weighted_vote_weights_by_p_keep():
    answers = ["7", "7", "8", "7", "8"]
    weights = [0.1, 0.1, 0.9, 0.1, 0.8]
    ev = run(fresh(lambda i: [answers[i]]), FakeScorer(lambda i, n: weights[i]), strategy="weighted-vote", budget=5)
    c = chosen(ev)
    assert c.answer == "8" and c.votes == pytest.approx(1.7) and c.sample == 2


def test_vote_without_any_answer_falls_back_to_best_sample():
    ev = run(fresh(lambda i: ["none"]), None, strategy="vote", budget=3)
    assert chosen(ev).answer is None


def test_tally_ties_go_to_more_samples_then_earlier_answer():
    assert tally(["a", "b", "b"], [1.0, 0.5, 0.5]) == [("b", 1.0), ("a", 1.0)]
    assert tally(["a", "b"], [1.0, 1.0]) == [("a", 1.0), ("b", 1.0)]


def test_extractors():
    assert last_number("so 3 apples cost $1,200.50 in total.") == "1200.5"
    assert last_number("answer: -4.0") == "-4"
    assert last_number("no digits") is None
    assert make_extractor("regex", r"answer is (\w+)")("answer is x, no, the answer is y") == "y"
    assert exact_text("  The   answer\n") == "The answer"


# -- compute accounts and the stream ----------------------------------------------------------------------
CASES = [
    dict(strategy="single"),
    dict(strategy="best-of-n", budget=5),
    dict(strategy="adaptive", budget=8, threshold=1.0),
    dict(strategy="prune", budget=8, k=2, prune_at=(3, 6)),
    dict(strategy="adaptive+prune", budget=8, k=2, prune_at=(3,), threshold=1.0),
    dict(strategy="vote", budget=4),
    dict(strategy="weighted-vote", budget=4),
]


@pytest.mark.parametrize("cfg", CASES, ids=[c["strategy"] for c in CASES])
def test_compute_account_adds_up(cfg):
    script = lambda i: ["t"] * (5 + 3 * (i % 4))  # some end early, some run to max_tokens
    e = fresh(script)
    sc = FakeScorer(lambda i, n: ((i * 5 + n) % 11) / 11)
    ev = run(e, sc, max_tokens=12, **cfg)
    u = usage(ev)
    finished = of(ev, Finished)
    assert u.samples_started == len(of(ev, SampleStarted)) == len(finished) == len(e.started)
    assert len({f.sample for f in finished}) == len(finished)  # exactly one Finished per sample
    assert u.generated_tokens == len(of(ev, Token)) == sum(f.n_tokens for f in finished)
    assert u.generated_tokens == sum(len(s.generated) for s in e.started)
    assert u.samples_pruned == len(of(ev, Pruned))
    assert u.selfeval_tokens == sc.decoded_tokens == 5 * len(of(ev, Scored))
    assert u.decode_calls == e.decode_calls
    assert u.prompt_tokens == 3 and u.wall_s >= 0
    assert isinstance(ev[-2], Chosen) and e.free_sequences == 32  # every sequence, the prompt's too, given back


def test_every_strategy_is_registered():
    assert set(STRATEGIES) == {"single", "best-of-n", "adaptive", "prune", "adaptive+prune", "vote", "weighted-vote",
                               "weighted-best-of-n", "beam", "lookahead", "revise", "auto"}


def test_stopping_the_stream_early_gives_sequences_back():
    e = fresh(words(50))
    it = run_strategy(e, [1, 2], StrategyConfig(strategy="best-of-n", budget=4), FakeScorer(lambda i, n: 0.5))
    for _, ev in zip(range(10), it):
        pass
    it.close()
    assert e.free_sequences == 32


def test_a_prompt_or_scorer_of_the_wrong_type_is_a_usage_error_before_anything_is_decoded():
    e = fresh()
    with pytest.raises(UsageError, match=r"^a prompt is a string, a list of chat messages or a list of token ids, "
                                         r"got None$"):  # not read as "no prompt" (an empty one)
        run_strategy(e, None, StrategyConfig(strategy="single"))
    with pytest.raises(UsageError, match=r"^scorer must be a SelfEvaluator or have steps\(samples\) and "
                                         r"decoded_tokens \(the Scorer protocol\), got object$"):
        run_strategy(e, [1, 2], StrategyConfig(strategy="best-of-n", budget=2), object())  # type: ignore[arg-type]
    assert e.decode_calls == 0 and e.free_sequences == 32


def test_too_few_sequences_is_a_clear_error():
    with pytest.raises(BudgetError, match="needs 17 free sequences"):
        run(fresh(parallel=8), FakeScorer(lambda i, n: 0.5), strategy="best-of-n", budget=16)
    assert samples_at_once(StrategyConfig(strategy="adaptive", budget=16)) == 8


def test_configuration_errors_raise_before_anything_is_decoded():
    e = fresh(parallel=4)
    with pytest.raises(BudgetError):
        run_strategy(e, [1], StrategyConfig(strategy="vote", budget=8))  # no iteration needed
    assert e.decode_calls == 0 and e.free_sequences == 4


def test_a_config_given_as_a_dict_runs_as_its_strategy_config():
    scorer = FakeScorer(lambda i, n: [0.2, 0.9, 0.5][i])
    as_dict = list(run_strategy(fresh(), [1, 2, 3], {"strategy": "best-of-n", "n": 3}, scorer))
    as_config = run(fresh(), scorer, strategy="best-of-n", budget=3)
    assert as_dict[:-1] == as_config[:-1] and chosen(as_dict).sample == 1  # the last, Done, holds wall time
    with pytest.raises(UsageError, match="strategy config: budget: Input should be greater than or equal to 1"):
        run_strategy(fresh(), [1, 2, 3], {"strategy": "vote", "budget": 0})


def test_context_too_small_is_a_clear_error():
    from edge_adapt.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match="exceed the context"):
        run(fresh(n_ctx_seq=100), FakeScorer(lambda i, n: 0.5), strategy="best-of-n", max_tokens=96)


# -- configuration ----------------------------------------------------------------------------------------
def test_keep_is_the_settings_name_everywhere():
    """--keep on the command line, `keep` in the HTTP API and in a config file (`k`, the field's own name, too)."""
    assert StrategyConfig.parse({"strategy": "prune", "budget": 8, "keep": 2}).k == 2
    assert StrategyConfig.parse({"strategy": "prune", "budget": 8, "k": 2}).k == 2
    with pytest.raises(UsageError, match="strategy config: keep: Input should be greater than or equal to 1"):
        StrategyConfig.parse({"keep": 0})


@pytest.mark.parametrize("cfg, names", [({"budget": 4, "n": 2}, "budget and n"),
                                        ({"strategy": "prune", "budget": 4, "keep": 1, "k": 2}, "keep and k")])
def test_an_option_given_by_both_its_names_is_refused_as_given_twice(cfg, names):
    """Was: "n: Extra inputs are not permitted", though n is the budget's other name."""
    with pytest.raises(UsageError, match=rf"^strategy config: {names} name the same option, given twice: give one of "
                                         r"them$"):
        StrategyConfig.parse(cfg)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(strategy="prune", budget=4, k=8), "keep (8) must be <= budget (4)"),
        (dict(threshold=1.5), "threshold: Input should be less than or equal to 1"),
        (dict(threshold=-0.1), "threshold: Input should be greater than or equal to 0"),
        (dict(strategy="bean"), "unknown strategy 'bean'"),
        (dict(strategy="beam", budget=6, beam_width=4), "budget (6) must be a multiple of the beam width M (4)"),
        (dict(strategy="lookahead", budget=2, beam_width=4), "budget (2) must be a multiple"),
        (dict(strategy="revise", budget=1), "revise needs a budget of at least 2"),
        (dict(strategy="prune", prune_at=[32, 300], max_tokens=256), "prune point 300 is not below max_tokens (256)"),
        (dict(strategy="prune", prune_at=[64, 32]), "must be increasing"),
        (dict(extractor="regex"), "needs a `pattern`"),
        (dict(extractor="regex", pattern="("), "not a valid regex"),
        (dict(t_min=2.0, t_max=1.0), "t_min (2.0) must be <= t_max (1.0)"),
        (dict(bogus=1), "bogus: Extra inputs are not permitted"),
        # Refused here, not at the first decode (stop) or read as 1 (a bool).
        (dict(stop=[""]), "stop: stop strings must be non-empty"),
        (dict(stop=""), "stop: stop strings must be non-empty"),
        (dict(budget=True), "budget: must be a whole number, got True"),
        (dict(max_tokens=True), "max_tokens: must be a whole number, got True"),
        (dict(strategy="prune", prune_at=[True]), "prune_at: must be a whole number"),
    ],
)
def test_invalid_config_is_a_one_line_error(cfg, message):
    with pytest.raises(UsageError) as err:
        StrategyConfig.parse(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_from_toml_and_json(tmp_path):
    toml = tmp_path / "strategy.toml"
    toml.write_text('strategy = "prune"\nn = 16\nk = 4\nprune_at = [32, 64]\n[self_eval]\nquestion = "Better?"\n')
    cfg = StrategyConfig.from_file(toml, threshold=0.5, budget=None)
    assert (cfg.strategy, cfg.budget, cfg.k, cfg.prune_at, cfg.threshold) == ("prune", 16, 4, (32, 64), 0.5)
    assert cfg.self_eval is not None and cfg.self_eval.question == "Better?"
    js = tmp_path / "s.json"
    js.write_text('{"strategy": "adaptive", "budget": 8, "schedule": "exponential"}')
    assert StrategyConfig.from_file(js).schedule == "exponential"
    js.write_text('{"strategy": "adaptive", "budget": 0}')
    with pytest.raises(UsageError, match=r"s\.json: budget"):
        StrategyConfig.from_file(js)


def test_config_file_settings_the_strategy_does_not_read_are_refused(tmp_path):
    """A file's keep/threshold/policy beside best-of-n were ignored in silence, where the same flags are refused."""
    toml = tmp_path / "strategy.toml"
    toml.write_text('strategy = "best-of-n"\nbudget = 2\nkeep = 1\nthreshold = 0.9\npolicy = "none.json"\n')
    with pytest.raises(UsageError, match=r"^keep, threshold, policy in .*strategy\.toml are not used by strategy "
                                         r"best-of-n$"):
        StrategyConfig.from_file(toml)
    # An override naming another strategy leaves the file's settings for its own unread too.
    toml.write_text('strategy = "beam"\nbudget = 4\nbeam_width = 2\n')
    with pytest.raises(UsageError, match=r"^beam_width in .* is not used by strategy best-of-n$"):
        StrategyConfig.from_file(toml, strategy="best-of-n")
    assert StrategyConfig.from_file(toml, strategy="lookahead").width == 2
    # A chat keeps them for the strategies /strategy may switch to.
    assert StrategyConfig.from_file(toml, strategy="best-of-n", unread_ok=True).beam_width == 2


@pytest.mark.parametrize("cfg, message", [
    ({"strategy": "best-of-n", "budget": 2, "keep": 1}, "keep is not used by strategy best-of-n"),
    (StrategyConfig(strategy="adaptive", budget=2, temperature=1.5), "temperature is not used by strategy adaptive"),
    ({"strategy": "single", "budget": 4, "prune_at": [4]}, "budget, prune_at are not used by strategy single"),
])
def test_run_strategy_refuses_options_the_strategy_does_not_read(cfg, message):
    """Was: run in silence without them, where the CLI, a config file and the server refuse them."""
    e = fresh()
    with pytest.raises(UsageError, match=rf"^{message}$"):
        run_strategy(e, [1, 2, 3], cfg)
    assert e.free_sequences == 32  # refused before anything was opened; defaults left unread are not named


def test_config_file_value_overridden_under_its_other_name(tmp_path):
    """`n` in the file and a `budget` given were both passed on, and pydantic refused `n` as an extra input."""
    toml = tmp_path / "strategy.toml"
    toml.write_text('strategy = "prune"\nn = 16\nkeep = 4\n')
    cfg = StrategyConfig.from_file(toml, budget=8, k=2)
    assert (cfg.budget, cfg.k) == (8, 2)


def test_config_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    """`policy` was read from the current directory while `[self_eval] adapter` was the file's neighbour."""
    (tmp_path / "cfg").mkdir()
    toml = tmp_path / "cfg" / "auto.toml"
    toml.write_text('strategy = "auto"\npolicy = "p.json"\n[self_eval]\nadapter = "a.gguf"\n')
    monkeypatch.chdir(tmp_path)
    cfg = StrategyConfig.from_file(Path("cfg/auto.toml"))
    assert cfg.policy == Path("cfg/p.json") and cfg.self_eval is not None and cfg.self_eval.adapter == Path("cfg/a.gguf")
    assert StrategyConfig.from_file(Path("cfg/auto.toml"), policy=Path("mine.json")).policy == Path("mine.json")


@pytest.mark.parametrize(
    "choice, message",
    [
        ({"strategy": "best-of-n", "options": {"budget": 1, "beam_width": 7, "lookahead": 3}},
         "best-of-n does not read beam_width, lookahead"),
        ({"strategy": "vote", "options": {"n": 2, "keep": 1}}, "vote does not read keep"),
        ({"strategy": "adaptive", "options": {"temperature": 0.5}}, "adaptive does not read temperature"),
        ({"strategy": "best-of-n", "options": {"budget": 1, "n": 50}}, "options budget and n are one setting"),
        ({"strategy": "probe", "options": {"budget": 3}}, "the probe runs nothing more: it does not read budget"),
    ],
)
def test_policy_choice_options_its_strategy_does_not_read_are_refused(choice, message):
    """A best-of-n bin's beam_width (or an `n` beside its budget) loaded and was ignored in silence."""
    from edge_adapt.strategies.policy import PolicyChoice

    with pytest.raises(ValueError, match=message):
        PolicyChoice.model_validate(choice)
    # the same settings its strategy does read
    PolicyChoice.model_validate({"strategy": "adaptive", "options": {"schedule": "constant", "temperature": 0.5}})
    PolicyChoice.model_validate({"strategy": "lookahead", "options": {"n": 4, "beam_width": 2, "lookahead": 3}})


def test_one_stop_string_is_taken_as_generate_takes_it():
    assert StrategyConfig.parse({"stop": "\n\n"}).stop == ("\n\n",)


def test_with_options_revalidates():
    cfg = StrategyConfig(strategy="best-of-n", budget=8)
    assert cfg.with_options(budget=4, threshold=None).budget == 4
    with pytest.raises(UsageError, match="keep \\(8\\) must be <= budget \\(4\\)"):
        StrategyConfig(k=8, budget=8).with_options(budget=4)


def test_default_prune_keeps_a_quarter():
    assert StrategyConfig(strategy="prune", budget=16).keep_k == 4
    assert StrategyConfig(strategy="prune", budget=16, prune_threshold=0.5).keep_k is None


# -- specs: each strategy declares what it needs, in its own module -------------------------------------------
STRATEGY_MODULES = ("single", "best_of_n", "adaptive", "prune", "vote", "beam", "lookahead", "revise", "auto")


def test_registry_lists_every_strategy_modules_spec():
    """Each strategy module registers the specs of the strategies it defines, and nothing else is registered."""
    specs = set(STRATEGIES.values())
    where = {spec.run.__module__.rsplit(".", 1)[1] for spec in specs}
    assert where == set(STRATEGY_MODULES)
    assert {s.name for s in specs} == {"single", "best-of-n", "adaptive", "adaptive+prune", "prune", "vote",
                                       "weighted-vote", "beam", "lookahead", "revise", "auto"}
    assert STRATEGIES["weighted-best-of-n"] is STRATEGIES["weighted-vote"]  # an alias, declared with its spec


@pytest.mark.parametrize("module", ("registry", "config", "run", *STRATEGY_MODULES))
def test_each_strategy_module_imports_alone(module):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import edge_adapt.strategies.{module}"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()


def test_the_registry_imports_no_strategy():
    import ast
    from pathlib import Path

    import edge_adapt.strategies.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {f"edge_adapt.strategies.{m}" for m in STRATEGY_MODULES} & imported


def _peak_policy(tmp_path) -> Path:
    """A strategy per bin, each as large as its row allows (the row's budget less the probe)."""

    def row(best_of_n: int, beam: int, lookahead: int, last: dict) -> list[dict]:
        return [{"strategy": "probe"}, {"strategy": "best-of-n", "options": {"budget": best_of_n}},
                {"strategy": "beam", "options": {"budget": beam}},
                {"strategy": "lookahead", "options": {"budget": lookahead}}, last]

    budgets = {"2": row(1, 1, 1, {"strategy": "adaptive"}),  # revise needs 2
               "4": row(2, 2, 2, {"strategy": "revise", "options": {"budget": 3}}),
               "8": row(2, 4, 2, {"strategy": "revise", "options": {"budget": 4}})}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"format": "edge-adapt-policy/1", "model": "fake", "bin_edges": [0.2, 0.4, 0.6, 0.8],
                                "budgets": budgets}))
    return path


@pytest.mark.parametrize("budget", (2, 4, 8))
@pytest.mark.parametrize("name", sorted(set(STRATEGIES)))
def test_declared_sequences_are_exactly_what_a_run_holds_at_most(name, budget, tmp_path):
    """An engine with the spec's samples + the prompt's sequence runs the strategy; it never holds more. Scores
    vary so that pruning, beams and auto's bins all take their paths."""
    extra = {"policy": _peak_policy(tmp_path), "max_tokens": 64} if name == "auto" else {}
    cfg = StrategyConfig(strategy=name, budget=budget, max_step_tokens=3, prune_at=(4,), **extra)
    need = samples_at_once(cfg) + 1
    e = fresh(lambda i: ["x", "y\n"] * (2 + i % 3), parallel=need)
    for p in (0.1, 0.5, 0.9):  # auto: bins 5, 3 and 1
        # one config for every strategy: each reads the options it has
        ev = list(run_strategy(e, [1, 2, 3], cfg, FakeScorer(lambda i, n: (p + 0.07 * (i % 5)) % 1), unread_ok=True))
        assert isinstance(ev[-1], Done) and e.free_sequences == need
        assert e.peak <= need


def test_prune_survivors_are_chosen_by_their_end_score():
    """As the replay the policy is tuned on: the survivors run to the end and the best end score answers (a
    score read at the last prune point is not the answer's)."""
    sc = FakeScorer(lambda i, n: (0.9 if i == 0 else 0.5) if n <= 8 else (0.2 if i == 0 else 0.6))
    ev = run(fresh(words(20)), sc, strategy="prune", budget=4, k=2, prune_at=(8,), max_tokens=40)
    finals = {s.sample: s.p_keep for s in of(ev, Scored) if s.final}
    assert set(finals) == {0, 1} and finals[0] == 0.2  # both survivors scored again once they had finished
    assert chosen(ev).sample == 1 and chosen(ev).p_keep == 0.6


class CancelledEngine(FakeEngine):
    """The engine once `cancel()` lands after `after` generated tokens: the samples a step program was generating
    end with finish reason 'cancelled', later step programs end theirs at once, and a decode (a scorer's suffix,
    revise's turns) raises Cancelled."""

    def __init__(self, *args, after: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.after, self.tokens, self.cancelled = after, 0, False

    def steps(self, samples, until=None, *, max_new=None, pause_on=None) -> Iterator:
        live = [s for s in samples if s.finish is None]
        if not self.cancelled:
            for ev in super().steps(samples, until, max_new=max_new, pause_on=pause_on):
                yield ev
                self.tokens += isinstance(ev, Token)
                self.cancelled = self.tokens >= self.after
                if self.cancelled:
                    break
        if self.cancelled:
            for s in live:
                if s.finish is None:
                    yield s.end("cancelled")

    def extend(self, updates) -> None:
        if self.cancelled:
            raise Cancelled()
        super().extend(updates)


class DecodingScorer(FakeScorer):
    """Scores as the self-evaluator does, after a decode of its suffix."""

    def steps(self, samples: Seq[Sample]) -> Iterator:
        if samples:
            yield Decode.of([(s.seq, self.suffix) for s in samples])
        return (yield from super().steps(samples))


@pytest.mark.parametrize("name", sorted(set(STRATEGIES)))
def test_a_cancel_ends_every_strategy_with_cancelled_not_an_answer(name, tmp_path):
    """As best-of-n, whose scoring decode raises: single and vote decode nothing after their samples, and answered
    with one cut short (Chosen with finish 'cancelled')."""
    extra = {"policy": _peak_policy(tmp_path), "max_tokens": 64} if name == "auto" else {}
    scorer = DecodingScorer(lambda i, n: 0.5) if STRATEGIES[name].needs_scorer else None  # as run_strategy gives
    e = CancelledEngine(words(50), parallel=32, after=3)
    seen = []
    with pytest.raises(Cancelled):
        for ev in run_strategy(e, [1, 2, 3], StrategyConfig(strategy=name, budget=4, **extra), scorer, unread_ok=True):
            seen.append(ev)
    assert e.cancelled and not of(seen, Chosen) and not of(seen, Done)
    assert {f.reason for f in of(seen, Finished)} >= {"cancelled"}  # the samples cut short are ended first
    assert e.free_sequences == 32  # every sequence given back


@pytest.mark.parametrize("budget, ratio", [(3, 0.5), (5, 0.5), (7, 0.4), (11, 0.5), (9, 1.0)])
def test_revise_holds_no_more_than_it_declares_when_chains_differ_in_length(budget, ratio):
    """The engine is sized from the declaration: as many sequences as chains, each as long as the longest chain's
    window of attempts and turns."""
    from edge_adapt.strategies.run import plan_run

    cfg = StrategyConfig(strategy="revise", budget=budget, sequential_ratio=ratio, max_tokens=8)
    plan = plan_run(fresh(), [1, 2, 3], cfg, suffix=0)
    e = fresh(lambda i: ["x", "y"] * (1 + i % 3), parallel=plan.sequences)
    ev = list(run_strategy(e, [1, 2, 3], cfg, FakeScorer(lambda i, n: 0.5)))
    assert isinstance(ev[-1], Done) and len(e.started) == budget and e.peak <= plan.sequences
    assert max(len(ctx) + len(s.generated) for ctx, s in zip(e.contexts, e.started)) <= plan.tokens_per_sequence


def test_a_stop_string_that_is_not_valid_unicode_is_refused_in_the_config():
    with pytest.raises(UsageError, match="stop: stop string .* is not valid Unicode"):
        StrategyConfig.parse({"stop": ["a\udcffb"]})
