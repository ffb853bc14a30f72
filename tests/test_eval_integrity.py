"""What the evaluation harness refuses or keeps whole: held-out splits, self-eval scores, pool-cache lines,
report directories, policy paths, and what the report's text claims."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edge_adapt.engine import Engine
from edge_adapt.errors import UsageError, validated
from edge_adapt.eval import EvalConfig, run_eval
from edge_adapt.eval.pool import PoolSettings, build_pool
from edge_adapt.tasks import arith_suite

from test_eval_standin import StandInSelfEval  # tests/ is on sys.path under pytest (rootdir-less layout)

SETTINGS = PoolSettings(k=3, temperature=0.8, max_tokens=10, prune_points=(4,), seed=0)


@pytest.fixture(scope="module")
def engine():
    with Engine(parallel=SETTINGS.k + 2, ctx=256, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def scorer(engine):
    return StandInSelfEval(engine)


# -- 1. the test numbers come from prompts the tuning never saw ----------------------------------------------
def test_tune_policy_never_reports_test_numbers_on_its_tuning_prompts(tmp_path):
    from edge_adapt.eval.tune_run import TuneConfig

    def tune(test_split: str | None = "test", **pool: object) -> TuneConfig:
        fields = {"split": "validation", "k": 2, "n_prompts": 10, "cache_dir": tmp_path, **pool}
        return validated(TuneConfig, {"pool": EvalConfig(**fields), "test_split": test_split}, "tune-policy")

    assert tune().test_split == "test" and tune(split="train", test_split="validation").pool.split == "train"
    with pytest.raises(UsageError, match="--test-split validation is the split the policy is tuned on"):
        tune("validation")  # was accepted: "10 prompts the tuning never saw" were the tuning's own
    with pytest.raises(UsageError, match="never tuned on the test split"):
        tune(None, split="test")
    suite = tmp_path / "mine.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(12)))
    for name in (str(suite), "gsm8k"):  # both read their file whole, whatever --split says
        with pytest.raises(UsageError, match="has no splits .* leave it out"):
            tune("test", suite=name)
        assert tune(None, suite=name).test_split is None  # tuning alone is fine
        # A --split other than tune-policy's default was ignored in silence, as eval's was (the file is read whole).
        with pytest.raises(UsageError, match=r"^--split train: suite '.*' has no splits"):
            tune(None, suite=name, split="train")
        # a library pool that leaves the split out (its default, test) is not refused for it
        validated(TuneConfig, {"pool": EvalConfig(suite=name, k=2, n_prompts=10, cache_dir=tmp_path)}, "tune-policy")
        with pytest.raises(UsageError, match=r"^--split validation: suite '.*' has no splits"):
            run_eval(EvalConfig(suite=name, split="validation", out_dir=tmp_path / "r"))
        assert not (tmp_path / "r").exists()
    assert tune("test", family="gsm8k").test_split == "test"  # the hash-split family has splits


def test_tune_policy_cli_refuses_a_shared_split_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, cli

    proc = cli("tune-policy", "-o", str(tmp_path / "p.json"), "--split", "validation", "--test-split", "validation",
               "--prompts", "10", "-k", "2", "--cache", str(tmp_path / "c"), "--model", str(tmp_path / "none.gguf"))
    assert_one_line_error(proc, "is the split the policy is tuned on")
    assert proc.returncode == 2 and not (tmp_path / "c").exists()


# -- 8. a policy path that is a directory ------------------------------------------------------------------------
def test_a_policy_path_that_is_a_directory_is_refused_before_the_model_loads(tmp_path):
    from edge_adapt.eval.tune_run import TuneConfig, run_tune

    # A model that does not exist: loading it would fail with another message, so this one came first.
    pool = EvalConfig(split="validation", k=2, n_prompts=10, cache_dir=tmp_path / "c", model=tmp_path / "none.gguf")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="dir is a directory"):
        run_tune(TuneConfig(pool=pool, out=tmp_path / "dir", force=True))


# -- 2. self-eval scores are probabilities ---------------------------------------------------------------------
class _Skewed(StandInSelfEval):
    """A self-evaluator whose first score is replaced by `bad` (a broken adapter, a user's --selfeval class)."""

    bad: object = float("nan")

    def score(self, samples):
        return [self.bad, *super().score(samples)[1:]]


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25, float("inf"), "0.5"])
def test_a_self_eval_score_outside_0_1_is_refused_naming_the_evaluator(engine, tmp_path, bad):
    skewed = _Skewed(engine)
    skewed.bad = bad
    with pytest.raises(UsageError, match=rf"self-evaluator .*_Skewed returned the score {bad!r}.*in \[0, 1\]"):
        list(build_pool(engine, skewed, arith_suite("test", 1), SETTINGS, tmp_path))
    assert not any(p.stat().st_size for p in tmp_path.glob("pool-*.jsonl"))  # nothing cached


# -- 3. pool-cache lines -------------------------------------------------------------------------------------------
def _edit(line: str, change) -> str:
    d = json.loads(line)
    change(d)
    return json.dumps(d)


CORRUPTIONS = {  # name: (the line's number, how it is corrupted, what the error says)
    "garbage": (1, lambda ln: "garbage" + ln, "Invalid JSON"),
    "a JSON list": (1, lambda ln: "[1, 2]", "Input should be an object"),
    "end_score 7.5": (2, lambda ln: _edit(ln, lambda d: d["samples"][0].update(end_score=7.5)), "not in \\[0, 1\\]"),
    "NaN end_score": (2, lambda ln: _edit(ln, lambda d: d["samples"][1].update(end_score=float("nan"))),
                      "some samples are scored and some are not"),
    "n_tokens -3": (1, lambda ln: _edit(ln, lambda d: d["samples"][2].update(n_tokens=-3)), "greater than or equal to 0"),
    "n_tokens that disagree": (1, lambda ln: _edit(ln, lambda d: d["greedy"].update(n_tokens=d["greedy"]["n_tokens"] + 1)),
                               "log-probabilities for n_tokens"),
    "end_score 'abc'": (2, lambda ln: _edit(ln, lambda d: d["samples"][0].update(end_score="abc")), "valid number"),
    "a \\xff byte": (1, lambda ln: ln.replace('"text":"', '"text":"\udcff', 1), "Invalid JSON"),
    "no samples": (2, lambda ln: _edit(ln, lambda d: d.update(samples=[])), "at least 1 item"),
    "K-1 samples": (2, lambda ln: _edit(ln, lambda d: d.update(samples=d["samples"][:2])), "2 samples, not K=3"),
}


@pytest.fixture(scope="module")
def cached_pool(engine, scorer, tmp_path_factory) -> Path:
    """A real pool cache of two prompts."""
    where = tmp_path_factory.mktemp("pool")
    list(build_pool(engine, scorer, arith_suite("test", 2), SETTINGS, where))
    (path,) = where.glob("pool-*.jsonl")
    return path


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_cache_line_is_one_error_naming_it(engine, scorer, cached_pool, tmp_path, name):
    """Was: skipped and regenerated (garbage, a list), used as is (7.5, -3: wrong Brier and ECE), or an
    unexpected TypeError / UnicodeDecodeError / ValueError, exit 70."""
    lineno, corrupt, why = CORRUPTIONS[name]
    lines = cached_pool.read_text().splitlines()
    lines[lineno - 1] = corrupt(lines[lineno - 1])
    path = tmp_path / cached_pool.name
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    decoded = engine.decoded_tokens
    with pytest.raises(UsageError, match=rf"{path.name}:{lineno} is corrupt \(.*{why}.*\); delete the line or the file"):
        list(build_pool(engine, scorer, arith_suite("test", 2), SETTINGS, tmp_path))
    assert engine.decoded_tokens == decoded  # refused before generating anything


def test_only_a_torn_last_line_is_regenerated_and_cut_off(engine, scorer, cached_pool, tmp_path):
    """A killed write leaves a last line without its newline (here cut inside a UTF-8 character): that line
    alone is regenerated, and the fragment is cut before the new line is appended, never left mid-file."""
    first, second = cached_pool.read_bytes().splitlines()
    path = tmp_path / cached_pool.name
    path.write_bytes(first + b"\n" + second[:40] + "é".encode()[:1])
    steps = list(build_pool(engine, scorer, arith_suite("test", 2), SETTINGS, tmp_path))
    assert [s.generated for s in steps] == [False, True]
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and lines[0] == first  # no fragment in between
    again, was = json.loads(lines[1]), json.loads(second)
    assert again["key"] == was["key"] and [s["text"] for s in again["samples"]] == [s["text"] for s in was["samples"]]
    assert not any(s.generated for s in build_pool(engine, scorer, arith_suite("test", 2), SETTINGS, tmp_path))


@pytest.mark.parametrize("cut_in", [b'"logprobs":[', b'"text":"'])  # a number's digits, a string's characters
def test_a_torn_line_an_earlier_resume_left_mid_file_is_skipped(engine, scorer, cached_pool, tmp_path, cut_in):
    """Before this version a resumed run appended after a torn line, leaving JSON that stops short mid-file;
    such a cache is read as it always was (the line holds no value to misread). Was: a line cut inside a string
    was called corrupt."""
    first, second = cached_pool.read_bytes().splitlines()
    path = tmp_path / cached_pool.name
    torn = second[: second.index(cut_in) + len(cut_in) + 3]
    path.write_bytes(first + b"\n" + torn + b"\n" + second + b"\n")
    assert not any(s.generated for s in build_pool(engine, scorer, arith_suite("test", 2), SETTINGS, tmp_path))


def test_every_cut_of_a_cache_line_reads_as_cut_short_and_no_corruption_does(cached_pool):
    """Whatever byte a killed write stopped at (inside a string, a \\u escape, a number, a literal), the line is
    known for a torn one; a line changed otherwise is not. Was: cuts inside strings were called corrupt."""
    from edge_adapt.eval.pool import _cut_short

    line = cached_pool.read_bytes().splitlines()[0]
    extra = json.dumps({"text": "é 12\\\"", "xs": [1.5e-3, -0.25, None, True, False], "o": {"k": "v"}}).encode()
    for whole in (line, extra):
        assert not _cut_short(whole)
        assert [i for i in range(1, len(whole)) if not _cut_short(whole[:i])] == []
    for changed in (b'{"a": 1.}', b'{"a": tru }', b'{"a": "x\\q"}', b'{"a": 1} x', b"[1, 2", b'garbage{"a": 1'):
        assert not _cut_short(changed), changed


def test_an_unscored_pool_is_null_on_disk_and_reads_back(cached_pool, tmp_path):
    """A remote pool sampled for labels only has no scores (NaN in memory): null in the file, strict JSON."""
    import math

    from edge_adapt.eval.pool import PoolCache, PromptPool

    pool = PromptPool.from_dict(json.loads(cached_pool.read_text().splitlines()[0]))
    unscored = [replace(s, end_score=math.nan, scores=(None,)) for s in (*pool.samples, pool.greedy)]
    pool = replace(pool, samples=tuple(unscored[:-1]), greedy=unscored[-1])
    cache = PoolCache(tmp_path / "pool-x.jsonl")
    cache.append(pool)
    assert "NaN" not in cache.path.read_text() and '"end_score":null' in cache.path.read_text()
    (back,) = cache.load().values()
    assert all(math.isnan(s.end_score) for s in (*back.samples, back.greedy)) and back.samples[0].text == pool.samples[0].text


class _HandMade:
    """A pool backend that makes each prompt's pool by hand and rescores by copying: no model."""

    fingerprint = "fp"

    def __init__(self, identity: str, sample: bool = True) -> None:
        self.identity, self.sample = identity, sample

    def generate(self, work, suite, settings):
        from edge_adapt.eval.pool import PoolSample, PromptPool, sample_key

        assert self.sample, "sampled again"
        for problem, key in work:
            made = [PoolSample(index=i, temperature=0.7, seed=i, text="4", n_tokens=2, logprobs=(-0.1, -0.2),
                               finish="length", scores=(), end_score=0.5, selfeval_tokens=(1.0,), extracted="4",
                               correct=False, tokens=(5, 6)) for i in (*range(settings.k), -1)]
            yield PromptPool(key, problem.id, problem.level, problem.answer, 2, tuple(made[:-1]), made[-1], 0.1,
                             (1, 2), sample_key(self.fingerprint, suite.name, settings, problem))

    def rescore(self, settings, key, other):
        return replace(other, key=key, rescore_s=1.0)


def test_a_corrupt_pool_of_another_suite_does_not_stop_this_one(tmp_path):
    """Was: every pool-*.jsonl in the cache directory was read to find samples to rescore, so one corrupt line in
    another suite's pool stopped every eval and label using the directory."""
    from edge_adapt.eval.pool import build_pool_from, samples_in
    from edge_adapt.tasks import family_suite, get_family

    suite, settings = arith_suite("test", 2), PoolSettings(k=2, max_tokens=8, prune_points=())
    list(build_pool_from(_HandMade("fp|a"), suite, settings, tmp_path))
    (tmp_path / "pool-units-0123456789abcdef.jsonl").write_text("garbage\n")  # another suite's pool
    (tmp_path / "pool-arith.jsonl").write_text("garbage\n")  # not a name the harness writes
    again = list(build_pool_from(_HandMade("fp|b", sample=False), suite, settings, tmp_path / "b",
                                 rescore=samples_in(tmp_path, suite)))  # eval: another scorer rescores the samples
    assert [s.pool.rescore_s for s in again] == [1.0, 1.0]
    taken = list(build_pool_from(_HandMade("fp|c", sample=False), suite, settings, tmp_path / "c",
                                 samples_in(tmp_path, suite)))  # label: takes them as they are
    assert [s.generated for s in taken] == [False, False]
    # What is read: this suite's pools, its families' own and a mix's; a corrupt line there is still an error.
    from edge_adapt.eval.pool import pool_sources

    assert pool_sources(suite) == {"arith", "mix"}
    assert pool_sources(family_suite(get_family("units"), "test", 2)) == {"units", "mix"}
    (tmp_path / "pool-mix-fedcba9876543210.jsonl").write_text("garbage\n")
    with pytest.raises(UsageError, match="pool-mix-fedcba9876543210.jsonl:1 is corrupt"):
        list(build_pool_from(_HandMade("fp|d", sample=False), suite, settings, tmp_path / "d",
                             rescore=samples_in(tmp_path, suite)))


def test_the_pool_line_says_which_prompts_were_scored_again(tmp_path):
    """Was: `eval --adapter none` on a cache of another scorer's pool printed "5 read from the cache" for prompts
    whose samples it had just scored again."""
    from edge_adapt.eval.pool import build_pool_from, pool_job, samples_in
    from edge_adapt.progress import finish

    suite, settings = arith_suite("test", 3), PoolSettings(k=2, max_tokens=8, prune_points=())
    list(build_pool_from(_HandMade("fp|a"), suite, settings, tmp_path))

    def last_line(identity: str) -> str:
        lines: list[str] = []
        finish(pool_job("pool", build_pool_from(_HandMade(identity, sample=False), suite, settings,
                                                tmp_path / "b", rescore=samples_in(tmp_path, suite))),
               lambda p: lines.append(p.message or p.info))
        return lines[-1]

    assert last_line("fp|b") == "pool: 3 prompts, 3 scored again from an earlier pool"
    assert last_line("fp|b") == "pool: 3 prompts, 3 read from the cache"  # the second time they are this pool's own


def test_force_replaces_a_reports_own_files_only(tmp_path):
    """Was: every *.png in the report directory was taken for the report's, so --force deleted the user's."""
    from edge_adapt.eval.report import report_dir

    out = tmp_path / "out"
    out.mkdir()
    plots = ["accuracy_vs_samples.png", "per_level.png"]  # the old report's, as its report.json lists them
    for name in ("report.md", *plots, "my-chart.png", "notes.md"):
        (out / name).write_text("old")
    (out / "report.json").write_text(json.dumps({"plots": plots}))
    with report_dir(out) as tmp:
        (tmp / "report.md").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["my-chart.png", "notes.md", "report.md"]
    assert (out / "my-chart.png").read_text() == "old" and (out / "report.md").read_text() == "new"
    # A report.json that cannot be read names no plots: every PNG stays but the report's own two files.
    (out / "per_level.png").write_text("old")
    (out / "report.json").write_text("{not json")
    with report_dir(out) as tmp:
        (tmp / "report.md").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["my-chart.png", "notes.md", "per_level.png", "report.md"]


# -- 5. a report directory is swapped in whole -------------------------------------------------------------------
def test_a_report_is_swapped_in_whole_and_keeps_what_is_not_a_report(engine, scorer, tmp_path, monkeypatch):
    import edge_adapt.eval.run as run

    cfg = EvalConfig(suite="arith", n_prompts=3, k=3, max_tokens=10, prune_points=[4], cache_dir=tmp_path / "c",
                     out_dir=tmp_path / "out", threads=1)
    run_eval(cfg, engine=engine, scorer=scorer)
    out = tmp_path / "out"
    (out / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed_mid_plot(report, where):
        (where / "accuracy_vs_samples.png").write_bytes(b"")  # the kill lands here
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_plots", killed_mid_plot)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg.model_copy(update={"force": True}), engine=engine, scorer=scorer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # was: a 0-byte PNG beside the old report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # no temporary directory left behind
    monkeypatch.setattr(run, "write_plots", lambda report, where: [])
    run_eval(cfg.model_copy(update={"force": True}), engine=engine, scorer=scorer)
    assert (out / "notes.md").read_text() == "mine"  # --force replaces the report, not the user's files
    assert not any(p.suffix == ".png" for p in out.iterdir())  # the old report's plots went with it

    def strict(x: str) -> float:
        raise ValueError(f"report.json holds {x}")

    json.loads((out / "report.json").read_text(), parse_constant=strict)  # strict JSON: no NaN
    monkeypatch.chdir(out)
    with pytest.raises(UsageError, match="holds the working directory"):
        run_eval(cfg.model_copy(update={"force": True, "out_dir": Path(".")}), engine=engine, scorer=scorer)


# -- 9. what the report claims --------------------------------------------------------------------------------------
def test_the_report_calls_its_judge_reference_what_it_is():
    """The interpolated judge is a judge that resamples wrong greedy answers at random, not a bound: the score's
    share of its gain reached 1.75."""
    from edge_adapt.eval.report import LiveCheck, Report, StrategyRow

    row = StrategyRow(strategy="adaptive", setting="first=greedy threshold=0.5 N<=4", accuracy=0.5, ci_low=0.4,
                      ci_high=0.6, mean_samples=1.5, mean_tokens=30, mean_selfeval_tokens=10, judge_accuracy=0.4,
                      judge_gain_share=1.75)
    live = LiveCheck(strategy="adaptive", setting="s", prompts=3, live_accuracy=0.5, live_ci=(0.1, 0.9),
                     replay_accuracy=0.5, replay_ci=(0.2, 0.8), within_replay_ci=True, live_mean_samples=2,
                     replay_mean_samples=2, live_mean_tokens=20, replay_mean_tokens=20)
    md = Report(title="t", model="m", selfeval="s", suite="arith", split="test", prompts=3, k=4, temperature=0.7,
                max_tokens=16, prune_points=[8], pool_file="f", generation_wall_s=1, prompts_generated=3,
                tokens_generated=9, levels={}, strategies=[row], calibration=[], live=[live]).markdown()
    assert "perfect judge" not in md and "at random" in md and "not a ceiling" in md
    assert "| random-allocation judge |" in md and "| 0.400 | 1.75 |" in md
    assert "strategy run for real vs its replay" not in md and "not what annealing the temperature" in md
