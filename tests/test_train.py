"""Self-eval training: label targets, the dataset, and an end-to-end smoke (label -> train -> export -> score)."""

from __future__ import annotations

import math

import json
from pathlib import Path

import numpy as np
import pytest

from edge_adapt.engine import GREEDY, Engine
from edge_adapt.errors import UsageError
from edge_adapt.eval.pool import PoolSample, PromptPool
from edge_adapt.train.labels import (
    FORMAT, VERSION, LabelConfig, cut_points, label, merge_labels, prompt_record, read_labels, target_against,
    targets,
)


def test_targets_right_wrong_pool():
    # 1 right of 4: the right one beats nothing strictly... all others are not better -> 1; a wrong one has 2 of 3
    # others not better (the other wrongs) -> 2/3 = 1 - pass rate of the others.
    assert targets([1, 0, 0, 0]) == [1.0, 2 / 3, 2 / 3, 2 / 3]
    assert targets([0, 0]) == [1.0, 1.0]  # nobody can do better than a hopeless prompt's answer
    assert targets([1, 1, 0]) == [1.0, 1.0, 0.0]  # both others are right: restarting would do better


def test_targets_graded_scores_count_ties_as_not_better():
    assert targets([0.5, 0.2, 0.9, 0.5]) == [2 / 3, 0.0, 1.0, 2 / 3]


def test_target_of_the_greedy_answer_is_against_all_samples():
    assert target_against(0.0, [1, 0, 0, 1]) == 0.5
    assert target_against(1.0, [1, 0, 0, 1]) == 1.0


def test_targets_need_two_samples():
    with pytest.raises(ValueError):
        targets([1.0])


def test_cut_points_are_where_the_sample_was_still_generating():
    assert cut_points(40, [16, 32, 64]) == [16, 32]
    assert cut_points(16, [16, 32]) == []  # its 16th token ended it: a pruner at 16 saw it finished
    assert cut_points(17, [16, 32]) == [16]


def _sample(index: int, correct: bool, tokens: tuple[int, ...], n_tokens: int | None = None) -> PoolSample:
    n = len(tokens) + 1 if n_tokens is None else n_tokens
    return PoolSample(index, 0.7, 1, "t", n, (), "eos", (), 0.5, (0.0,), None, correct, tokens)


def test_prompt_record_rows_and_targets_on_a_hand_made_pool():
    samples = (_sample(0, True, tuple(range(20))), _sample(1, False, (5, 6, 7)), _sample(2, False, tuple(range(40)), 40))
    pool = PromptPool("k", "p1", 2, "7", 3, samples, _sample(-1, True, (9, 9)), 0.1, (1, 2, 3), "sk")
    rec = prompt_record(pool, "prompt", [16, 32], include_greedy=True)
    rows = [(r["sample"], r["cut"], len(r["ids"]), r["target"]) for r in rec["rows"]]
    assert rows == [
        (0, None, 20, 1.0), (0, 16, 16, 1.0),
        (1, None, 3, 0.5),
        (2, None, 40, 0.5), (2, 16, 16, 0.5), (2, 32, 32, 0.5),
        (-1, None, 2, 1.0),
    ]
    assert rec["pass_rate"] == pytest.approx(1 / 3) and rec["prompt_ids"] == [1, 2, 3]
    assert rec["rows"][1]["ids"] == list(range(16))


def test_read_labels_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(UsageError, match="not an edge-adapt label file"):
        read_labels(bad)
    with pytest.raises(UsageError, match="not found"):
        read_labels(tmp_path / "missing.jsonl")


def test_a_cut_may_hold_a_whole_response_that_ended_right_after_it():
    """A reply of 8 text tokens and an end-of-text token (not kept in the ids) is still generating at 8: its cut at
    8 holds all its ids, as `label` writes it."""
    from edge_adapt.train.labels import _bad_record

    rows = [{"sample": 0, "cut": cut, "ids": ids, "correct": True, "target": 1.0}
            for cut, ids in ((None, [5, 6, 7]), (3, [5, 6, 7]))]
    assert _bad_record({"problem_id": "p", "prompt_ids": [1, 2], "rows": rows}) is None
    rows[1].update(cut=4, ids=[5, 6, 7, 8])
    assert "not the first 4 tokens" in _bad_record({"problem_id": "p", "prompt_ids": [1, 2], "rows": rows})


def test_merged_label_files_count_a_shared_prompt_once(tmp_path):
    def write(name: str, model: str, ids: list[str]) -> Path:
        f = tmp_path / name
        recs = [{"problem_id": i, "prompt_ids": [1], "rows": [{"sample": 0, "cut": None, "ids": [5], "correct": True,
                                                                "target": 1.0, "source": name}]} for i in ids]
        f.write_text("\n".join(json.dumps(x) for x in [{"format": FORMAT, "version": VERSION, "model": model}, *recs]))
        return f

    a, b = write("a.jsonl", "m", ["p1", "p2"]), write("b.jsonl", "m", ["p2", "p3"])
    merged = merge_labels([a, b])
    assert [(r["problem_id"], r["rows"][0]["source"]) for r in merged.prompts] == [
        ("p1", "a.jsonl"), ("p2", "a.jsonl"), ("p3", "b.jsonl")]
    with pytest.raises(UsageError, match="c.jsonl was labelled with other"):
        merge_labels([a, write("c.jsonl", "other", ["p4"])])


def test_label_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "l.jsonl"
    out.write_text("mine")
    with pytest.raises(UsageError, match="--force"):
        label(LabelConfig(out=out, n_prompts=1, k=2))
    assert out.read_text() == "mine"



def _label_set(tmp_path: Path, prompts: dict[str, list[bool]]) -> Path:
    """A label file by hand: per prompt id, one whole response per correctness flag, each with the target
    `targets` gives it (the share of the others not better)."""
    recs = []
    for pid, flags in prompts.items():
        t = targets([float(x) for x in flags])
        recs.append({"problem_id": pid, "level": 1, "prompt_ids": [1, 2],
                     "rows": [{"sample": i, "cut": None, "ids": [5 + i], "correct": ok, "target": t[i]}
                              for i, ok in enumerate(flags)]})
    f = tmp_path / "hand.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [{"format": FORMAT, "version": VERSION, "model": "m"}, *recs]))
    return f


def test_blend_target_keeps_right_above_wrong_and_ranks_wrongs_by_what_more_samples_would_fix(tmp_path):
    from edge_adapt.train.trainer import groups_of

    # "easy": 3 of 4 right, so a wrong reply there is fixed by restarting; "hopeless": none right.
    labels = read_labels(_label_set(tmp_path, {"easy": [True, True, True, False], "hopeless": [False] * 4}))
    got = {kind: [[r.target for r in g.rows] for g in groups_of(labels, kind, 0.3)]
           for kind in ("correct", "relative", "blend")}
    assert got["correct"] == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert got["relative"] == [[1, 1, 1, 0], [1, 1, 1, 1]]  # a hopeless prompt's wrong reply is "keep"
    assert got["blend"] == [[1, 1, 1, pytest.approx(0.0)], [pytest.approx(0.3)] * 4]
    half = groups_of(labels, "blend", 0.5)
    assert [r.target for r in half[1].rows] == [pytest.approx(0.5)] * 4
    assert all(r.correct == (r.target == 1) for g in groups_of(labels, "blend", 0.3) for r in g.rows)
    with pytest.raises(ValueError, match="unknown target"):
        groups_of(labels, "nonsense")


def test_blend_of_a_wrong_reply_scales_with_the_others_failing():
    from edge_adapt.train.trainer import row_target

    # A wrong reply whose 3 others have 1 right: relative target 2/3, blend 0.3 * 2/3.
    row = {"correct": False, "target": 2 / 3}
    assert row_target(row, "blend", 0.3) == pytest.approx(0.2)
    assert row_target(row, "blend", 0.0) == row_target(row, "correct") == 0.0
    assert row_target(row, "blend", 1.0) == pytest.approx(row_target(row, "relative"))


def test_train_config_refuses_a_weight_outside_0_1(tmp_path):
    from pydantic import ValidationError

    from edge_adapt.train.config import TrainConfig

    with pytest.raises(ValidationError):
        TrainConfig(labels=[tmp_path / "a"], validation=[tmp_path / "b"], out=tmp_path, target="blend",
                    relative_weight=1.5)


def test_validation_metrics_break_down_by_family_when_there_are_several():
    from edge_adapt.train.trainer import EpochResult, Row, _epoch_metrics, _Validation

    def row(ok: bool) -> Row:
        return Row(0, None, 3, float(ok), ok)

    # units: the score ranks perfectly; dates: backwards; a user's own id belongs to no family.
    v = _Validation(0.0, [0.9, 0.1, 0.2, 0.8, 0.5, 0.4], [row(True), row(False), row(True), row(False), row(True),
                                                          row(False)], [1, 1, 1, 1, 2, 2],
                    ["units", "units", "dates", "dates", None, None], [0, 0, 1, 1, 2, 2])
    res = _epoch_metrics(1, 0.0, v, 0.0)
    assert res.auroc_by_family == {"dates": 0.0, "units": 1.0}
    assert res.within_prompt_auroc == pytest.approx(2 / 3)  # one pair per prompt: right, wrong, right
    assert res.breakdown() == "dates 0.000 units 1.000"
    one = EpochResult(1, 0.0, 0.0, 0.5, 0.2, 0.25, 0.1, auroc_by_level={"1": 0.5}, auroc_by_family={"units": 0.5})
    assert one.breakdown() == "L1 0.500"  # one family: its levels


def test_rank_loss_asks_for_right_above_wrong_within_each_cut_of_one_prompt():
    import torch

    from edge_adapt.train.trainer import Row, rank_loss

    def row(cut: int | None, ok: bool) -> Row:
        return Row(0, cut, 3, float(ok), ok)

    rows = [row(None, True), row(None, False), row(16, True), row(16, False), row(8, False), row(8, False)]
    # Whole replies and cut 16 are mixed, cut 8 has only wrong replies (nothing to rank there).
    diff = torch.tensor([2.0, -1.0, 0.0, 0.0, 5.0, -5.0], requires_grad=True)
    loss = rank_loss(rows, diff)
    expected = (-torch.log_softmax(torch.tensor([2.0, -1.0]), 0)[0] + math.log(2)) / 2
    assert float(loss) == pytest.approx(float(expected))
    loss.backward()
    assert diff.grad[0] < 0 < diff.grad[1] and diff.grad[2] < 0 < diff.grad[3]  # right up, wrong down
    assert diff.grad[4] == diff.grad[5] == 0
    # Ranking right first costs less than ranking it last; no mixed cut: nothing to learn from.
    assert float(rank_loss(rows[:2], torch.tensor([3.0, 0.0]))) < float(rank_loss(rows[:2], torch.tensor([0.0, 3.0])))
    assert rank_loss(rows[4:], torch.tensor([1.0, 2.0])) is None


@pytest.mark.parametrize("pid, family", [("units-L3-validation-7", "units"), ("arith-L1-train-0", "arith"),
                                         ("gsm8k-L2-test-0", "gsm8k"), ("units", None), ("mine-L1-x", None),
                                         ("units-x", None), ("q17", None)])
def test_family_named_by_a_problem_id(pid, family):
    from edge_adapt.tasks.registry import family_named

    assert family_named(pid) == family

@pytest.mark.slow
def test_default_cuts_stop_below_a_familys_own_budget(engine: Engine, tmp_path: Path):
    """`label --family units` (replies of at most 64 tokens) labels at the default cuts below 64: it was refused
    with "cuts [16, 32, 64] must be below max_tokens 64", as was `label --suite mix`."""
    out = label(LabelConfig(out=tmp_path / "units.jsonl", family="units", split="train", n_prompts=1, k=2,
                            cache_dir=tmp_path / "cache"), engine)
    header = read_labels(out).header["settings"]
    assert header["cuts"] == [16, 32] and header["max_tokens"] == 64


@pytest.mark.slow
def test_label_train_export_score_end_to_end(engine: Engine, tmp_path: Path):
    """A few prompts labelled, a few steps trained, exported, and loaded by the runtime: the runtime's score
    equals the trained model's, the metadata picks the suffix with no flags, and generation is unchanged."""
    pytest.importorskip("peft")
    from edge_adapt.selfeval import SelfEvaluator
    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import _Scorer, groups_of, train

    common = dict(k=4, max_tokens=24, cuts=[8], cache_dir=tmp_path / "cache")
    tr = label(LabelConfig(out=tmp_path / "train.jsonl", split="train", n_prompts=3, **common), engine)
    va = label(LabelConfig(out=tmp_path / "val.jsonl", split="validation", n_prompts=2, **common), engine)
    labels = read_labels(tr)
    assert labels.header["settings"]["k"] == 4 and len(labels.prompts) == 3
    assert all(0.0 <= r["target"] <= 1.0 for p in labels.prompts for r in p["rows"])

    # Labelling again reuses the pool cache: nothing is generated.
    before = engine.decoded_tokens
    label(LabelConfig(out=tmp_path / "again.jsonl", split="train", n_prompts=3, **common), engine)
    assert engine.decoded_tokens == before
    assert read_labels(tmp_path / "again.jsonl").prompts == labels.prompts

    cfg = TrainConfig(labels=tr, validation=va, out=tmp_path / "run", epochs=1, max_steps=2, prompts_per_step=2,
                      lr=1e-3, threads=2)
    prompt = engine.tokenize(engine.chat_prompt([{"role": "user", "content": "What is 2 + 5?"}]))

    def greedy(score_with: SelfEvaluator | None) -> list[int]:
        r = engine.open(prompt)
        (s,) = engine.start(r, [GREEDY], max_tokens=12)
        try:
            for _ in engine.advance([s], until=6):
                pass
            if score_with is not None:
                score_with.score([s])
            for _ in engine.advance([s]):
                pass
            return list(s.generated)
        finally:
            engine.release(s.seq)
            engine.release(r)

    base_greedy = greedy(None)
    result = train(cfg)
    assert result.exported.exists() and (tmp_path / "run" / "metrics.json").exists()
    from edge_adapt.engine.gguf_file import inspect_gguf

    assert inspect_gguf(result.exported, expect="adapter").name == f"{engine.info.name} self-eval adapter"  # `info`'s title for it
    assert len(result.epochs) == 2  # before training + one epoch
    # Strict JSON, which every reader takes: the epoch before training has no training loss, written as null.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["epochs"][0]["train_loss"] is None and metrics["epochs"][1]["train_loss"] > 0
    # Continuing from the checkpoint starts where that run ended: its before-training validation is the first
    # run's last epoch, not the untrained model's.
    # (It also trains with the within-prompt ranking loss on: the real scorer's rows through rank_loss.)
    again = train(cfg.model_copy(update={"out": tmp_path / "again", "init": tmp_path / "run" / "checkpoint",
                                         "max_steps": 1, "rank_weight": 1.0}))
    assert again.epochs[0].brier == pytest.approx(result.epochs[-1].brier, abs=1e-5)
    assert abs(again.epochs[0].brier - result.epochs[0].brier) > 1e-4
    # So does continuing from the exported GGUF (imported back to PEFT; f16 tensors round the weights a little).
    from_gguf = train(cfg.model_copy(update={"out": tmp_path / "from-gguf", "init": result.exported, "max_steps": 1}))
    assert from_gguf.epochs[0].brier == pytest.approx(result.epochs[-1].brier, abs=1e-4)
    # Continuing at a higher rank widens the adapter without changing a score: the same starting validation.
    # (Torch on both sides, f32; the zero columns add exact zeros, so only summation order differs: ~1e-7.)
    grown = train(cfg.model_copy(update={"out": tmp_path / "grown", "init": tmp_path / "run" / "checkpoint",
                                         "rank": 16, "max_steps": 1}))
    # A continued run's starting adapter is a candidate too: the export is never worse, by validation AUROC,
    # than what it started from (it was an epoch's, whatever epoch 0 scored).
    for run in (again, from_gguf, grown):
        best = max((e.auroc or 0) for e in run.epochs)
        assert run.best_epoch == next(e.epoch for e in run.epochs if (e.auroc or 0) == best)
    assert grown.epochs[0].brier == pytest.approx(result.epochs[-1].brier, abs=1e-5)
    assert json.loads((tmp_path / "grown" / "checkpoint" / "adapter_config.json").read_text())["r"] == 16
    # Several validation files merge like training ones, and a training prompt in any of them is refused.
    with pytest.raises(UsageError, match="validation shares 3 prompts"):
        train(cfg.model_copy(update={"out": tmp_path / "leak", "validation": [va, tr]}))

    ev = SelfEvaluator(engine, adapter_path=result.exported)
    assert ev.suffix == json.loads((tmp_path / "run" / "metrics.json").read_text())["suffix_ids"]
    assert ev.base_part == [] and ev.adapter.invocation_tokens == ev.suffix  # aLoRA: on from the suffix on

    group = groups_of(read_labels(va))[0]

    def logit_diffs(eng: Engine, scorer: SelfEvaluator) -> np.ndarray:
        """logit(No) - logit(Yes) after each validation row (a response, or its cut), as the runtime reads it."""
        p_keep: list[float] = []
        with eng.opened(group.prompt_ids) as root:
            for lo in range(0, len(group.rows), 4):  # a group's rows (samples and their cuts) may outnumber free ids
                seqs = [eng.fork(root) for _ in group.rows[lo : lo + 4]]
                for s, r in zip(seqs, group.rows[lo : lo + 4]):
                    ids = group.responses[r.sample][: r.n_ids]
                    if ids:
                        eng.extend([(s, ids)])
                p_keep += scorer.score(seqs)
                for s in seqs:
                    eng.release(s)
        return np.array([math.log(p / (1 - p)) for p in p_keep])

    torch_scorer = _Scorer(cfg, tmp_path / "run" / "base-hf", ev.suffix, ev.yes_token, ev.no_token,
                           checkpoint=tmp_path / "run" / "checkpoint")
    rows, diff, _ = torch_scorer.logit_diffs(group, grad=False)
    trained = dict(zip(rows, diff.tolist()))
    ref = np.array([trained[r] for r in group.rows])
    # The same score from two implementations, compared as logit(No) - logit(Yes). Against an f32 GGUF of the
    # very weights torch ran (the dequantized base model), nothing is quantized but llama.cpp's f16 KV cache:
    # the two must agree closely on any CPU (measured: mean 0.002, max 0.003 logits).
    from edge_adapt.convert import convert_model

    f32 = convert_model(tmp_path / "run" / "base-hf", tmp_path / "base-f32.gguf", type="f32").path
    with Engine(model=f32, parallel=5, ctx=256, device="cpu") as exact:
        exact_ev = SelfEvaluator(exact, adapter_path=result.exported)
        err_exact = np.abs(logit_diffs(exact, exact_ev) - ref)
    print(f"runtime (f32 GGUF) vs torch logit diff: mean |d| {err_exact.mean():.4f}, max {err_exact.max():.4f}")
    assert err_exact.max() <= 0.05
    # The shipped Q4_1 file runs with Q8 activations through kernels llama.cpp picks per CPU, so its error against
    # torch is the file's quantization, not the runtime's wiring (checked just above), and it differs by CPU:
    # mean 0.12 / max 0.40 logits on an AMD EPYC (AVX2), mean 0.07 / max 0.30 on an Intel Xeon (AVX-512).
    # The bound is on the mean, twice the worst seen, because one row's error is what varies most by CPU.
    err = np.abs(logit_diffs(engine, ev) - ref)
    print(f"runtime (Q4_1) vs torch logit diff: mean |d| {err.mean():.3f}, max {err.max():.3f}")
    assert err.mean() <= 0.25

    # With the adapter loaded (and switched on for scoring mid-generation), greedy output is the base model's.
    assert greedy(ev) == base_greedy


def test_init_must_be_an_adapter_of_the_same_shape(tmp_path: Path):
    from edge_adapt.errors import UsageError
    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import _check_init

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = TrainConfig(labels=tmp_path / "l", validation=tmp_path / "v", out=tmp_path / "o", init=ckpt)
    with pytest.raises(UsageError, match="not a PEFT adapter checkpoint"):
        _check_init(cfg, ckpt, [1, 2, 3])
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "alora_invocation_tokens": [1, 2, 3]}))
    _check_init(cfg, ckpt, [1, 2, 3])
    with pytest.raises(UsageError, match="another self-eval suffix"):
        _check_init(cfg, ckpt, [1, 2, 4])
    assert _check_init(cfg.model_copy(update={"rank": 16}), ckpt, [1, 2, 3]) == 8  # the trainer grows it to 16
    with pytest.raises(UsageError, match="rank-8 alora adapter; this run trains a rank-4 alora one .a rank can grow"):
        _check_init(cfg.model_copy(update={"rank": 4}), ckpt, [1, 2, 3])
    with pytest.raises(UsageError, match="is an alora adapter; this run trains with --method lora .pass --method alora"):
        _check_init(cfg.model_copy(update={"method": "lora"}), ckpt, [1, 2, 3])
    with pytest.raises(UsageError, match="method full"):
        _check_init(cfg.model_copy(update={"method": "full"}), ckpt, [1, 2, 3])


def test_cli_label_and_train_bad_input_is_one_line(tmp_path):
    from test_cli import assert_one_line_error, cli

    assert_one_line_error(cli("train", str(tmp_path / "nope.jsonl"), "--validation", str(tmp_path / "v.jsonl"),
                              "-o", str(tmp_path / "o")), "label file not found")
    foreign = tmp_path / "f.jsonl"
    foreign.write_text("[1, 2]\n")
    assert_one_line_error(cli("train", str(foreign), "--validation", str(foreign), "-o", str(tmp_path / "o")),
                          "not an edge-adapt label file")
    assert_one_line_error(cli("train", str(foreign), "--validation", str(foreign), "-o", str(tmp_path / "o"),
                              "--method", "magic"), "method")
    # Trained before: 1e300 ended in "unexpected RuntimeError", a rank weight of 1e300 in NaN weights exported.
    for flag, value in (("--lr", "1e300"), ("--rank-weight", "1e300"), ("--rank-weight", "inf"), ("--lm-loss", "nan")):
        assert_one_line_error(cli("train", str(foreign), "--validation", str(foreign), "-o", str(tmp_path / "o"),
                                  flag, value), flag.removeprefix("--").replace("-", "_"))
    assert_one_line_error(cli("label", "-o", str(tmp_path / "l.jsonl"), "--cut", "32", "--cut", "16"), "cuts")
    assert_one_line_error(cli("label", "-o", str(tmp_path / "l.jsonl"), "--level", "9"), "arith has levels")
    assert not (tmp_path / "l.jsonl").exists()



def test_label_reuses_samples_an_eval_pool_already_generated(engine: Engine, tmp_path: Path):
    """Scores are taken on scratch forks, so an eval pool (any scorer, any prune points) holds exactly the samples
    labelling would draw: with matching sampling settings nothing is generated again."""
    from edge_adapt.eval.pool import PoolSettings, build_pool
    from edge_adapt.tasks import arith_suite
    from test_eval_standin import StandInSelfEval

    suite = arith_suite("train", 2)
    settings = PoolSettings(k=4, max_tokens=20, prune_points=(8,))
    evald = list(build_pool(engine, StandInSelfEval(engine), suite, settings, tmp_path))
    before = engine.decoded_tokens
    out = label(LabelConfig(out=tmp_path / "l.jsonl", n_prompts=2, k=4, max_tokens=20, cuts=[8], cache_dir=tmp_path),
          engine)
    assert engine.decoded_tokens == before
    got = read_labels(out).prompts
    assert [[r["ids"] for r in p["rows"] if r["cut"] is None] for p in got] == [
        [list(s.tokens) for s in (*e.pool.samples, e.pool.greedy)] for e in evald]


@pytest.mark.slow
def test_full_fine_tune_exports_a_self_describing_model(tmp_path: Path, engine: Engine):
    """Method `full` (with the LM loss that keeps the responses' distribution) exports a merged model whose
    metadata carries the suffix: the runtime scores with it and no adapter."""
    pytest.importorskip("peft")
    from edge_adapt.selfeval import SelfEvaluator
    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import train

    common = dict(k=3, max_tokens=16, cuts=[8], cache_dir=tmp_path / "cache")
    tr = label(LabelConfig(out=tmp_path / "train.jsonl", split="train", n_prompts=2, **common), engine)
    va = label(LabelConfig(out=tmp_path / "val.jsonl", split="validation", n_prompts=1, **common), engine)
    result = train(TrainConfig(labels=tr, validation=va, out=tmp_path / "full", method="full", lm_loss=0.1,
                               max_steps=1, prompts_per_step=1, validate_before=False, threads=2))
    assert result.exported.name == "model.gguf"
    with Engine(model=result.exported, parallel=2, ctx=128) as merged:
        ev = SelfEvaluator(merged)
        assert ev.adapter is None and ev.config.suffix == "<|im_end|>Restart"
        root = merged.open(merged.tokenize(merged.chat_prompt([{"role": "user", "content": "What is 1 + 1?"}])))
        try:
            (p,) = ev.score([root])
        finally:
            merged.release(root)
        assert 0.0 < p < 1.0
    assert merged.info.name == f"{engine.info.name} self-eval fine-tune"  # was: "checkpoint"
    # An aLoRA run over it with --force leaves no stale model.gguf beside its adapter (was: 145 MB of it).
    again = train(TrainConfig(labels=tr, validation=va, out=tmp_path / "full", max_steps=1, prompts_per_step=1,
                              validate_before=False, threads=2, force=True))
    assert again.exported.name == "adapter.gguf" and not (tmp_path / "full" / "model.gguf").exists()


def test_label_refuses_cuts_no_reply_can_reach_naming_the_flags(tmp_path):
    """Each reply is cut below its own budget, so a cut is refused only past the longest: a mix's `--cut 64` was
    refused with "cuts [16, 32, 64] must be below max_tokens 64", a --max-tokens the user never gave."""
    with pytest.raises(UsageError, match=r"^--cut 96 must be below the longest reply budget of suite 'arith', 96 "
                                         r"tokens \(--max-tokens sets one\)$"):
        label(LabelConfig(out=tmp_path / "l.jsonl", n_prompts=2, k=2, cuts=[32, 96]))
    with pytest.raises(UsageError, match=r"^--cut 32 must be below --max-tokens 32$"):
        label(LabelConfig(out=tmp_path / "l.jsonl", n_prompts=2, k=2, cuts=[32], max_tokens=32))
    with pytest.raises(UsageError, match="--cut 256 must be below the longest reply budget of suite 'mix', 256"):
        label(LabelConfig(out=tmp_path / "m.jsonl", suite="mix", n_prompts=9, k=2, cuts=[64, 256]))
    assert not list(tmp_path.iterdir())


def test_label_line_nested_too_deeply_is_one_named_error(tmp_path):
    """Was `error: unexpected RecursionError` (exit 70)."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"format": FORMAT, "version": VERSION, "model": "m"}) + "\n"
                    + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UsageError, match=f"^{deep}:2: JSON nested too deeply$"):
        read_labels(deep)


def test_train_refuses_inputs_inside_what_it_replaces_and_quiets_transformers_bars(tmp_path):
    """An input in out/base-hf (imported again as a whole), out/.new (staging) or out/checkpoint (replaced by the
    best epoch) was deleted by the run; checked before any work. Off a terminal (as here, under pytest's capture),
    transformers' "Loading weights" bar is silenced like edge-adapt's own."""
    pytest.importorskip("accelerate")
    from transformers.utils import logging as hf_logging

    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import train

    out = tmp_path / "out"
    hf_logging.enable_progress_bar()
    try:
        for sub in ("base-hf", ".new", "checkpoint"):
            (out / sub).mkdir(parents=True, exist_ok=True)
            labels = out / sub / "l.jsonl"
            labels.write_text("labels")
            cfg = TrainConfig(labels=labels, validation=tmp_path / "v.jsonl", out=out, force=True)
            with pytest.raises(UsageError, match=f"^{out / sub} holds the input {labels}: .*would delete the input"):
                train(cfg)
            assert labels.read_text() == "labels"
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_a_reply_that_was_only_end_of_text_is_a_row_train_reads(tmp_path):
    """A reply of just the end-of-text token has no ids (`label` keeps none of it): `train` refused the whole
    file with "has a row whose sample or ids are not token ids". Malformed ids are still refused."""
    from edge_adapt.train.trainer import groups_of

    f = _label_set(tmp_path, {"p": [True, False]})
    lines = f.read_text().split("\n")
    rec = json.loads(lines[1])
    rec["rows"][1]["ids"] = []
    f.write_text("\n".join([lines[0], json.dumps(rec)]))
    (group,) = groups_of(read_labels(f), "relative")
    assert group.responses == [[5], []]
    for bad in ([-1], [1.5], "5", [True]):
        rec["rows"][1]["ids"] = bad
        f.write_text("\n".join([lines[0], json.dumps(rec)]))
        with pytest.raises(UsageError, match="prompt record 1 has a row whose sample or ids are not token ids"):
            read_labels(f)


def test_train_config_refuses_settings_its_method_or_target_never_reads(tmp_path):
    """--lm-loss without --method full and --relative-weight without --target blend were accepted and changed
    nothing (byte-identical adapters); so was --rank with --method full."""
    from edge_adapt.errors import validated
    from edge_adapt.train.config import TrainConfig

    def cfg(**kw):
        return validated(TrainConfig, dict(labels="l.jsonl", validation="v.jsonl", out=tmp_path, **kw), "train")

    for kw, message in ((dict(lm_loss=5), "--lm-loss is read only by --method full"),
                        (dict(method="lora", lm_loss=5), "--lm-loss is read only by --method full"),
                        (dict(relative_weight=0.9), "--relative-weight is read only by --target blend, not relative"),
                        (dict(method="full", rank=4), "--rank is not used by --method full"),
                        (dict(method="full", targets=["q_proj"]), "--targets is not used by --method full"),
                        (dict(export_type="f16"), "--export-type is read only by --method full")):
        with pytest.raises(UsageError, match=f"^train: {message}"):
            cfg(**kw)
    # Each where it is read, and any at its default, is accepted.
    cfg(method="full", lm_loss=5, export_type="f16")
    cfg(target="blend", relative_weight=0.9)
    cfg(method="full", rank=8, relative_weight=0.3)


def test_best_epoch_is_by_brier_where_validation_cannot_give_an_auroc():
    """Validation replies all wrong (or all right): AUROC is undefined every epoch and epoch 1 was "best" with no
    measure behind it; the lower Brier score picks it, and the result says so."""
    from edge_adapt.train.trainer import EpochResult, best_by, better

    def epoch(n: int, auroc: float | None, brier: float) -> EpochResult:
        return EpochResult(n, 0.5, 0.5, auroc, brier, 0.25, 0.1)

    one_class = [epoch(1, None, 0.919), epoch(2, None, 0.872), epoch(3, None, 0.9)]
    mixed = [epoch(1, 0.6, 0.2), epoch(2, 0.7, 0.3), epoch(3, 0.65, 0.1)]
    for history, want, by in ((one_class, 2, "Brier"), (mixed, 2, "AUROC")):
        best = None
        for res in history:
            best = res if better(res, best) else best
        assert best is not None and (best.epoch, best_by(best)) == (want, by)


def test_label_split_of_a_file_suite_is_refused_not_ignored(tmp_path):
    """A file suite is read whole: `label --suite FILE.jsonl --split test` labelled the whole file."""
    suite = tmp_path / "good.jsonl"
    suite.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n')
    out = tmp_path / "s.jsonl"
    for name in (str(suite), "gsm8k"):
        with pytest.raises(UsageError, match=f"^--split test: suite '{name}' has no splits"):
            LabelConfig(out=out, suite=name, split="test")
    LabelConfig(out=out, suite=str(suite), split="train")  # the default: nothing to ignore
    LabelConfig(out=out, family="gsm8k", split="test")  # the hash-split family has splits
    with pytest.raises(UsageError, match="has no levels"):
        label(LabelConfig(out=out, suite=str(suite), levels=[1], cache_dir=tmp_path / "c"))


@pytest.mark.slow
def test_train_takes_a_reply_of_no_tokens_and_picks_by_brier_when_validation_is_one_class(engine: Engine,
                                                                                         tmp_path: Path):
    """A reply that was only end-of-text ("ids": []) stopped `train` ("max() arg is an empty sequence"), and with
    every validation reply wrong the first epoch was "best" with no measure behind it."""
    pytest.importorskip("peft")
    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import train

    common = dict(k=2, max_tokens=8, cuts=[4], cache_dir=tmp_path / "cache")
    tr = label(LabelConfig(out=tmp_path / "train.jsonl", split="train", n_prompts=2, **common), engine)
    va = label(LabelConfig(out=tmp_path / "val.jsonl", split="validation", n_prompts=1, **common), engine)

    def rewrite(path: Path, edit) -> None:
        header, *recs = [json.loads(x) for x in path.read_text().splitlines()]
        for rec in recs:
            edit(rec)
        path.write_text("".join(json.dumps(x) + "\n" for x in (header, *recs)))

    def empty_first(rec: dict) -> None:
        first = rec["rows"][0]["sample"]
        rec["rows"] = [r for r in rec["rows"] if r["sample"] != first or r["cut"] is None]
        rec["rows"][0]["ids"] = []

    def all_wrong(rec: dict) -> None:
        for r in rec["rows"]:
            r.update(correct=False, target=1.0)

    rewrite(tr, empty_first)
    rewrite(va, all_wrong)
    result = train(TrainConfig(labels=tr, validation=va, out=tmp_path / "run", epochs=2, prompts_per_step=1,
                               validate_before=False, threads=1))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(e["auroc"] is None for e in metrics["epochs"])
    assert result.best_by == metrics["best_by"] == "Brier"
    assert metrics["best_epoch"] == min(metrics["epochs"], key=lambda e: e["brier"])["epoch"]
