"""run_eval end to end on a tiny pool: report files, replay rows, calibration, live check, cached rerun."""

from __future__ import annotations

import json
import re

import pytest

from edge_adapt.engine import Engine
from edge_adapt.errors import UsageError
from edge_adapt.eval import EvalConfig, run_eval

from test_eval_standin import StandInSelfEval  # tests/ is on sys.path under pytest (rootdir-less layout)


@pytest.mark.slow
def test_run_eval_writes_report_and_reuses_the_pool(tmp_path):
    cfg = EvalConfig(suite="arith", n_prompts=5, k=4, max_tokens=12, prune_points=[4, 8], cache_dir=tmp_path / "c",
                     out_dir=tmp_path / "out", live=["best-of-8", "adaptive"], live_prompts=3)
    with Engine(parallel=cfg.k + 2, ctx=256) as e:
        rep = run_eval(cfg, engine=e, scorer=StandInSelfEval(e))
        assert rep.prompts == 5 and rep.prompts_generated == 5 and rep.levels == {str(i): 1 for i in range(1, 6)}
        with pytest.raises(UsageError, match="already exists and is not empty; pass --force"):
            run_eval(cfg, engine=e, scorer=StandInSelfEval(e))  # the report is not overwritten unasked
        again = run_eval(cfg.model_copy(update={"force": True}), engine=e, scorer=StandInSelfEval(e))
        assert again.prompts_generated == 0
        assert [s.accuracy for s in again.strategies] == [s.accuracy for s in rep.strategies]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Strategies" in md and "## Calibration" in md and "## Live check" in md and "PROVISIONAL" in md
    assert "every prompt read from the cache" in md  # the rerun generated nothing and says so
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    fams = {s["strategy"] for s in data["strategies"]}
    assert {"greedy", "best-of-n", "adaptive", "prune", "majority-vote", "weighted-vote"} <= fams
    assert {c["scope"] for c in data["calibration"]} >= {"all", "level 1", "prune point 4 tokens"}
    assert [c["strategy"] for c in data["live"]] == ["best-of-8", "adaptive"]
    pytest.importorskip("matplotlib")
    assert {"accuracy_vs_samples.png", "accuracy_vs_tokens.png", "gain_recovered.png"} <= set(rep.plots)
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in rep.plots)


def test_a_resumed_eval_says_so_and_its_report_names_seed_and_model_file(tmp_path):
    """Was: a resumed run said nothing of the prompts it read from the cache, and a report did not say which seed
    (which picks the arith problems) or model file made it."""
    from edge_adapt.eval.run import eval_job
    from edge_adapt.progress import finish

    cfg = EvalConfig(suite="arith", n_prompts=2, k=2, max_tokens=8, prune_points=[4], cache_dir=tmp_path / "c",
                     out_dir=tmp_path / "a", seed=3)
    with Engine(parallel=cfg.k + 2, ctx=256) as e:
        run_eval(cfg, engine=e, scorer=StandInSelfEval(e))
        lines: list[str] = []
        more = cfg.model_copy(update={"n_prompts": 3, "out_dir": tmp_path / "b"})
        rep = finish(eval_job(more, engine=e, scorer=StandInSelfEval(e)),
                     lambda p: lines.append(p.message) if p.message else None)
    assert rep.prompts_generated == 1 and rep.seed == 3 and rep.model_file == e.model_path.name
    assert len(lines) == 1
    assert re.fullmatch(r"pool arith/\w+ K=2: 3 prompts, 1 generated \(\d+ tokens in \d+ s\), 2 read from the cache",
                        lines[0]), lines
    md = (tmp_path / "b" / "report.md").read_text()
    assert "1 prompts generated" in md and "2 read from the cache" in md
    assert f"- model: `{e.model_path.name}`" in md and "seed 3," in md
    assert json.loads((tmp_path / "b" / "report.json").read_text())["seed"] == 3


def test_eval_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError):
        EvalConfig(prune_points=[32, 16])
    with pytest.raises(ValueError):
        EvalConfig(unknown_option=1)
    from edge_adapt.eval.run import pool_settings, suite_for

    cfg = EvalConfig(max_tokens=16, prune_points=[16])
    with pytest.raises(UsageError):
        pool_settings(cfg, suite_for(cfg))


def test_pool_budget_is_each_familys_own_unless_given():
    from edge_adapt.eval.run import pool_settings, suite_for
    from edge_adapt.tasks import FAMILIES

    def settings(**kw):
        cfg = EvalConfig(n_prompts=18, split="validation", **kw)
        return pool_settings(cfg, suite_for(cfg))

    # One family: its budget written into the settings, so the cache key equals an explicit --max-tokens of it.
    assert settings(family="steps").max_tokens == FAMILIES["steps"].max_tokens == 256
    assert settings(family="steps") == settings(family="steps", max_tokens=256)
    assert settings().max_tokens == 96  # arith, as before the flag had no default
    assert settings(family="steps", max_tokens=40).max_tokens == 40
    # A mix: no one budget; each problem keeps its family's.
    mix = EvalConfig(suite="mix", n_prompts=18, split="validation", prune_points=[16, 32])
    suite = suite_for(mix)
    s = pool_settings(mix, suite)
    assert s.max_tokens is None
    assert {p.id.split("-")[0]: s.budget(p) for p in suite.problems} == {n: f.max_tokens for n, f in FAMILIES.items()}
    # Prune points must lie below every family's budget (64 is the shortest).
    with pytest.raises(UsageError, match="^--prune-at 64 must be below the shortest reply budget of suite 'mix', 64 "):
        pool_settings(mix.model_copy(update={"prune_points": [32, 64]}), suite)


def test_default_prune_points_and_cuts_stop_below_the_shortest_reply_budget():
    from edge_adapt.errors import validated
    from edge_adapt.eval.run import pool_settings, suite_for
    from edge_adapt.tasks import load_suite

    def points(**kw):
        cfg = EvalConfig(n_prompts=6, split="validation", **kw)
        return list(pool_settings(cfg, suite_for(cfg)).prune_points)

    assert points(max_tokens=24) == [16] and points() == [16, 32]
    # Points a user gives are kept as given, and refused where they do not fit.
    # Named as the flags (was "prune_points: prune_points must be ...", "prune points [16, 32] must be below
    # max_tokens 24"), and a budget the user never gave as the suite's.
    with pytest.raises(UsageError, match=r"^--prune-at 32 must be below --max-tokens 24$"):
        points(max_tokens=24, prune_points=[16, 32])
    with pytest.raises(UsageError, match=r"^--prune-at 96 must be below the shortest reply budget of suite 'arith', "
                                         r"96 tokens \(--max-tokens sets one\)$"):
        points(prune_points=[16, 96])
    with pytest.raises(UsageError, match=r"^eval: prune_points: --prune-at must be positive and strictly increasing$"):
        validated(EvalConfig, {"prune_points": [32, 16]}, "eval")
    # Label cuts (default 16 32 64) against a short --max-tokens, and against a family's own 64-token budget,
    # the shortest of a mix (label --suite mix failed with "cuts [16, 32, 64] must be below max_tokens 64").
    arith = load_suite("arith", split="validation", n=4)
    mix = load_suite("mix", split="validation", n=12, family=None)
    assert arith.points_below_budget("cuts", [16, 32, 64], 40, given=False) == [16, 32]
    assert arith.points_below_budget("cuts", [16, 32, 64], 8, given=False) == []
    assert mix.points_below_budget("cuts", [16, 32, 64], None, given=False) == [16, 32]
    with pytest.raises(UsageError, match="cuts 64 must be below the shortest reply budget of suite 'mix', 64"):
        mix.points_below_budget("cuts", [16, 32, 64], None, given=True)


def _python_m_eval(argv, capsys):
    """`python -m edge_adapt.eval ARGV` in this process: its exit code and stderr (its signal handlers undone)."""
    import signal

    from edge_adapt.eval.__main__ import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code, capsys.readouterr().err


def test_python_m_eval_says_what_is_wrong_in_one_line(capsys):
    for argv, message in ((["n_prompts=3", "k=bogus"], "error: eval: k: Input should be a valid integer"),
                          (["nprompts"], "error: expected key=value, got 'nprompts'")):
        code, err = _python_m_eval(argv, capsys)
        assert code == 2
        assert err.startswith(message) and err.count("\n") == 1, err


def test_python_m_eval_ends_a_bug_in_one_line_as_the_command_does(capsys, monkeypatch):
    """An unexpected error is one `error: unexpected` line and exit 70, as `edge-adapt`; `--debug` lets the
    traceback through."""
    import edge_adapt.eval.__main__ as entry

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(entry, "run_eval", broken)
    code, err = _python_m_eval(["n_prompts=3"], capsys)
    assert code == 70
    assert err == "error: unexpected ZeroDivisionError: a bug (rerun with --debug for details)\n"
    with pytest.raises(ZeroDivisionError):
        _python_m_eval(["--debug", "n_prompts=3"], capsys)


@pytest.mark.parametrize("temp", [-1.0, 1000.0, float("nan")])
def test_a_pool_temperature_error_gives_the_range_a_pool_takes(temp):
    """`label --temp -1` said "0 (greedy)" was allowed, and `--temp 0` was then refused: a pool samples."""
    from edge_adapt.errors import validated
    from edge_adapt.eval.config import EvalConfig

    with pytest.raises(UsageError, match=r"temperature \(--temp\) must be a finite number in \[1e-6, 100\] "
                                         r"\(a pool samples: not 0\), got") as err:
        validated(EvalConfig, {"temperature": temp}, "eval")
    assert "greedy" not in str(err.value)
    with pytest.raises(UsageError, match="a pool samples: temperature must be > 0"):
        validated(EvalConfig, {"temperature": 0}, "eval")


def test_live_prompts_without_live_is_refused(tmp_path):
    """Was: accepted and ignored in silence; refused as a backend setting without --backend is."""
    from edge_adapt.errors import validated

    with pytest.raises(UsageError, match="^eval: --live-prompts is read only with --live$"):
        validated(EvalConfig, {"live_prompts": 3, "cache_dir": tmp_path}, "eval")
    assert validated(EvalConfig, {"live_prompts": 3, "live": ["adaptive"]}, "eval").live_prompts == 3
