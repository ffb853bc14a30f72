"""run_eval end to end on a tiny pool: report files, replay rows, calibration, live check, cached rerun."""

from __future__ import annotations

import json

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
        again = run_eval(cfg, engine=e, scorer=StandInSelfEval(e))
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


def test_eval_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError):
        EvalConfig(prune_points=[32, 16])
    with pytest.raises(ValueError):
        EvalConfig(unknown_option=1)
    from edge_adapt.eval.run import pool_settings

    with pytest.raises(UsageError):
        pool_settings(EvalConfig(max_tokens=16, prune_points=[16]))
