"""`run_eval(EvalConfig) -> Report`: the one call behind `edge-adapt eval`.

Build (or resume) the pool (yielding Progress events), replay every strategy, measure calibration, optionally run
strategies live, and write report.md, report.json and the PNGs to `out_dir`.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.engine import Engine
from edge_adapt.errors import UsageError
from edge_adapt.eval import metrics
from edge_adapt.eval.config import EvalConfig
from edge_adapt.eval.live import run_live
from edge_adapt.eval.plots import write_plots
from edge_adapt.backends import LocalBackend, PoolBackend
from edge_adapt.eval.pool import (
    PoolRun, PoolSettings, PromptPool, SelfEvalScorer, build_pool_from, pool_job, samples_in, settings_key,
)
from edge_adapt.eval import replay as rp
from edge_adapt.eval.report import LiveCheck, Report, calibrations, report_dir, report_json, strategy_rows
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.sizing import ensure, for_pool, for_strategy, load_engine
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.run import prompt_tokens
from edge_adapt.tasks import check_split, load_suite
from edge_adapt.tasks.base import Suite


def load_selfeval(spec: str) -> Callable[..., SelfEvalScorer]:
    """The self-evaluator class from 'module:Class'."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"self-evaluator {spec!r} cannot be loaded ({exc})") from None


def pool_settings(cfg: EvalConfig, suite: Suite) -> PoolSettings:
    """How the pool of `suite` is drawn. Without --max-tokens each problem takes its family's budget; when those
    are all one number (any suite but a mix) it is written into the settings, so the pool's cache key is the
    one an explicit --max-tokens of that number gives."""
    points = suite.points_below_budget("--prune-at", list(cfg.prune_points), cfg.max_tokens,
                                       given="prune_points" in cfg.model_fields_set)
    return PoolSettings(k=cfg.k, temperature=cfg.temperature, max_tokens=suite.budget(cfg.max_tokens),
                        prune_points=tuple(points), seed=cfg.seed)


def suite_for(cfg: EvalConfig) -> Suite:
    return nonempty(load_suite(cfg.suite, split=cfg.split, n=cfg.n_prompts, path=cfg.data, scorer=cfg.scorer,
                               seed=cfg.seed, family=cfg.family))


def nonempty(suite: Suite) -> Suite:
    """A suite with no problems is refused before a model is loaded."""
    if not suite.problems:
        from edge_adapt.errors import UsageError

        raise UsageError(f"suite {suite.name!r} holds no problems")
    return suite


def _live_checks(engine: Engine, scorer: SelfEvalScorer, suite: Suite, pools: list[PromptPool],
                 settings: PoolSettings, cfg: EvalConfig) -> Job[list[LiveCheck]]:
    n = min(cfg.live_prompts, len(pools))
    idx = list(range(n))
    problems = list(suite.problems[:n])
    threshold = cfg.live_threshold
    if threshold is None:
        threshold = float(np.median([s.end_score for p in pools for s in p.samples]))
    out = []
    for name in cfg.live:
        if name == "best-of-8":
            strat, budget = "best-of-n", min(8, settings.k)
            replayed = rp.best_of_n(pools, budget, "self-eval").subset(idx)
        else:
            strat, budget = "adaptive", settings.k
            # From greedy, as the live strategy starts (its first round is near temperature 0).
            replayed = rp.adaptive(pools, threshold, budget, seed=cfg.seed, greedy_first=True).subset(idx)
        outcomes = []
        for o in run_live(engine, scorer, suite, problems, settings, strat, budget, threshold,
                          greedy_first=strat == "adaptive"):
            outcomes.append(o)
            yield Progress(f"live {name}", len(outcomes), n, f"acc {np.mean([x.correct for x in outcomes]):.2f}")
        right = sum(o.correct for o in outcomes)
        lo, hi = replayed.ci(cfg.seed)
        live_acc = right / n
        out.append(LiveCheck(
            strategy=name, setting=replayed.setting, prompts=n, live_accuracy=live_acc, live_ci=metrics.wilson(right, n),
            replay_accuracy=replayed.accuracy, replay_ci=(lo, hi), within_replay_ci=lo <= live_acc <= hi,
            live_mean_samples=float(np.mean([o.samples for o in outcomes])), replay_mean_samples=replayed.mean_samples,
            live_mean_tokens=float(np.mean([o.tokens for o in outcomes])), replay_mean_tokens=replayed.mean_tokens,
        ))
    return out


def selfeval_config(cfg: EvalConfig) -> Any:
    """The self-evaluation settings a pool is scored with: cfg's adapter, or none at all without the default."""
    from edge_adapt.selfeval import SelfEvalConfig

    if cfg.adapter is not None:
        return SelfEvalConfig(adapter=cfg.adapter)
    return None if cfg.default_adapter else SelfEvalConfig(default_adapter=False)


def load_scorer(cfg: EvalConfig, engine: Engine) -> SelfEvalScorer:
    """cfg.selfeval's class on `engine`, with cfg's adapter (or none at all when default_adapter is off)."""
    extra: dict[str, Any] = {}
    if not cfg.default_adapter:
        from edge_adapt.selfeval import SelfEvalConfig

        extra["config"] = SelfEvalConfig(default_adapter=False)
    return load_selfeval(cfg.selfeval)(engine, adapter_path=cfg.adapter, **extra)


def pool_engine(cfg: EvalConfig, suites: list[Suite], live: list[StrategyConfig] = ()) -> tuple[Engine, SelfEvalScorer]:
    """An engine sized for the pools of `suites` and for `live` strategy runs on their longest prompt, with cfg's
    scorer on it. It is sized from the default self-evaluator's suffix, and grown if the scorer's is longer."""
    from edge_adapt.engine import EngineOptions, Vocab
    from edge_adapt.selfeval import suffix_tokens

    problems = [p for s in suites for p in s.problems]
    budget = max(s.longest_budget(cfg.max_tokens) for s in suites)
    with Vocab(cfg.model) as vocab:
        longest_id, longest_ids = max(((p.id, prompt_tokens(vocab, list(p.messages))) for p in problems),
                                      key=lambda pair: len(pair[1]))
        longest = len(longest_ids)
        suffix = len(suffix_tokens(vocab, selfeval_config(cfg)))
        extra = [for_strategy(vocab, longest_ids, c)[0] for c in live]
    # A prompt too long for the model is refused naming it, before any weights load (info: read by the Vocab).
    engine = load_engine(for_pool(longest, cfg.k, budget, suffix, extra=extra, prompt=longest_id),
                         EngineOptions(model=cfg.model, threads=cfg.threads), info=vocab.info)
    try:
        scorer = load_scorer(cfg, engine)
        ensure(engine, for_pool(longest, cfg.k, budget, len(getattr(scorer, "suffix", ())), extra=extra,
                                prompt=longest_id))
    except BaseException:
        engine.close()
        raise
    return engine, scorer


def pool_backend(cfg: EvalConfig, suites: list[Suite], live: list[StrategyConfig] = ()) -> PoolBackend:
    """Where cfg's pools are sampled and scored: the server at cfg.backend, or an engine in process sized for
    `suites` (and for `live` strategy runs) with cfg's scorer on it."""
    remote = cfg.remote()
    if remote is None:
        engine, scorer = pool_engine(cfg, suites, live)
        return LocalBackend(engine, scorer, cfg.adapter)
    if cfg.live or live:
        raise UsageError("live strategy runs happen in process: --live cannot be combined with --backend")
    if cfg.selfeval != EvalConfig.model_fields["selfeval"].default:
        raise UsageError(f"self-evaluator {cfg.selfeval} runs in process: the server scores with its own self-eval model")
    from edge_adapt.backends import RemoteBackend

    return RemoteBackend.open(remote, cfg.model, scores=True, selfeval_config=selfeval_config(cfg))


def pools_job(cfg: EvalConfig, backend: PoolBackend, suite: Suite) -> Job[tuple[PoolRun, str]]:
    """The pool of every prompt of `suite` (cached ones read back, missing ones made by `backend`) and the
    identity (model, adapter, self-eval) it was made with."""
    settings = pool_settings(cfg, suite)
    steps = build_pool_from(backend, suite, settings, cfg.cache_dir, rescore=samples_in(cfg.cache_dir, suite))
    run = yield from pool_job(f"pool {suite.name}/{suite.split} K={settings.k}", steps)
    return run, backend.identity


def eval_job(cfg: EvalConfig, *, engine: Engine | None = None, scorer: SelfEvalScorer | None = None) -> Job[Report]:
    """Evaluate: pool (cached, resumable) -> replays -> calibration -> optional live checks -> report files.
    Yields Progress while sampling.

    `engine` and `scorer` may be passed in (tests, apps that already hold a model); otherwise the engine is
    sized for the suite (edge_adapt.sizing: prompt, K samples, greedy) and the scorer is cfg.selfeval's class.
    A failed or interrupted run takes back the folders it created (the cache keeps any samples it holds).
    """
    from edge_adapt.fileio import check_output_dir, check_replaceable, removed_on_failure

    check_split(cfg.suite, cfg.split, type(cfg).model_fields["split"].default, cfg.family)
    check_output_dir(Path(cfg.out_dir), force=cfg.force)
    check_replaceable(Path(cfg.out_dir))
    check_output_dir(Path(cfg.cache_dir), force=False, reuse=True)
    with removed_on_failure(cfg.out_dir, cfg.cache_dir, keep=[cfg.cache_dir]):
        return (yield from _evaluate(cfg, engine, scorer))


def _evaluate(cfg: EvalConfig, engine: Engine | None, scorer: SelfEvalScorer | None) -> Job[Report]:
    suite = suite_for(cfg)
    settings = pool_settings(cfg, suite)
    if engine is not None:
        backend: PoolBackend = LocalBackend(engine, scorer if scorer is not None else load_scorer(cfg, engine),
                                            cfg.adapter)
    else:
        backend = pool_backend(cfg, [suite])
    try:
        out_dir = Path(cfg.out_dir)
        run, identity = yield from pools_job(cfg, backend, suite)
        pools, generated, tokens = run.pools, run.generated, run.tokens
        model_file = backend.model_path.name
        live = []
        if cfg.live and isinstance(backend, LocalBackend):
            live = yield from _live_checks(backend.engine, backend.scorer, suite, pools, settings, cfg)
    finally:
        if engine is None:
            backend.close()

    replays = rp.replay_all(pools, settings.prune_points, seed=cfg.seed)
    sk = settings_key(identity, suite.name, settings)
    notes = []
    rescored = [p for p in pools if p.rescore_s > 0]
    if rescored:
        notes.append(f"{len(rescored)} prompts' samples come from an earlier pool with the same model, prompts, sampling "
                     f"settings and seeds, scored again by this self-evaluator ({sum(p.rescore_s for p in rescored):.0f} s); "
                     "the generation time shown is the one that made them.")
    if "stand-in" in identity.lower() or "standin" in identity.lower():
        notes.append("PROVISIONAL: scored with a test stand-in self-evaluator (same suffix + two-logit p_keep), "
                     "not edge_adapt.selfeval; regenerate with the real scorer.")
    report = Report(
        title=f"edge-adapt eval: {suite.name} {suite.split}",
        model=backend.fingerprint, model_file=model_file, selfeval=identity.split("|selfeval=", 1)[1],
        suite=suite.name, split=suite.split, seed=cfg.seed,
        prompts=len(pools), k=settings.k, temperature=settings.temperature, max_tokens=settings.max_tokens,
        prune_points=list(settings.prune_points), pool_file=str(Path(cfg.cache_dir) / f"pool-{suite.name}-{sk}.jsonl"),
        generation_wall_s=run.wall_s if generated else sum(p.wall_s for p in pools), prompts_generated=generated, tokens_generated=tokens,
        levels={str(k): v for k, v in sorted(Counter(p.level for p in pools if p.level is not None).items())},
        strategies=strategy_rows(replays, pools, cfg.seed), calibration=calibrations(pools, settings.prune_points, suite),
        live=live, notes=notes,
    )
    with report_dir(out_dir) as tmp:
        report.plots = write_plots(report, tmp)
        (tmp / "report.json").write_text(report_json(report.model_dump(mode="json")))
        (tmp / "report.md").write_text(report.markdown())
    return report


run_eval = to_the_end(eval_job)
