"""The evaluation harness: sample pools generated once and cached, strategies replayed over them, calibration of
the self-eval score, live checks, and the report. `run_eval(EvalConfig)` is the entry point."""

from edge_adapt.eval.config import EvalConfig
from edge_adapt.eval.pool import PoolSettings, PoolSample, PromptPool, SelfEvalScorer, build_pool
from edge_adapt.eval.replay import Replay, replay_all
from edge_adapt.eval.report import Report
from edge_adapt.eval.run import run_eval

__all__ = ["EvalConfig", "Report", "run_eval", "PoolSettings", "PoolSample", "PromptPool", "SelfEvalScorer",
           "build_pool", "Replay", "replay_all"]
