"""`run_tune(TuneConfig)`: the one call behind `edge-adapt tune-policy`.

Tuning pool (cached like `eval`'s) -> candidate tables per budget -> two-fold cross-validation -> the policy,
written atomically. With a test split it also replays the written policy on test prompts it never saw, against
best-of-N and weighted best-of-N at the same budget, runs strategies that no pool can replay (beam, lookahead,
revise, auto itself) live on some of those prompts, and writes report.md / report.json / PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_adapt.engine import Engine
from edge_adapt.eval import replay as rp
from edge_adapt.eval import tune
from edge_adapt.eval.config import EvalConfig, read_only_with
from edge_adapt.eval.live import StrategyOutcome, run_strategy_live
from edge_adapt.eval.metrics import bootstrap_ci, wilson
from edge_adapt.eval.pool import PromptPool
from edge_adapt.eval.report import report_dir, report_json
from edge_adapt.backends import LocalBackend
from edge_adapt.eval.run import pool_backend, pool_settings, pools_job, suite_for
from edge_adapt.errors import UsageError
from edge_adapt.fileio import atomic_file, check_target
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.sizing import ensure, for_generation, for_strategy, load_engine
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.policy import N_BINS, Policy, self_eval_name
from edge_adapt.strategies.run import prompt_tokens

LIVE_SEED = 1_000_003  # live runs never reuse a pool's seeds


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: EvalConfig = Field(description="the tuning prompts' pool (suite, split, K, sampling, model, adapter)")
    budgets: list[int] = Field(default_factory=lambda: list(tune.DEFAULT_BUDGETS))
    tolerance: float = Field(0.02, ge=0, le=1, description="a cheaper choice within this accuracy of the best wins")
    out: Path = Field(Path("policy.json"), description="the policy file to write")
    force: bool = False
    test_split: str | None = Field(None, description="also report the policy on this split (never tuned on)")
    test_prompts: int = Field(200, ge=1)
    report_dir: Path | None = None
    live: list[str] = Field(default_factory=list, description="strategies to run live on test prompts")
    live_prompts: int = Field(40, ge=1)
    live_budget: int = Field(8, ge=2)
    compare_model: Path | None = Field(None, description="another GGUF model (a larger one, typically) answering the "
                                                         "test prompts greedily")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if any(b < 2 for b in v):
            raise ValueError("a budget must be at least 2 (the probe and one more sample)")
        return v

    @field_validator("live")
    @classmethod
    def _live(cls, v: list[str]) -> list[str]:
        for name in v:
            StrategyConfig.parse({"strategy": name}, f"--live {name}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        # A budget spends the probe and up to K more samples of the pool: past K + 1 it would be tuned on the same
        # choices as K + 1 and labelled with a budget it never spends.
        most = self.pool.k + 1
        if "budgets" not in self.model_fields_set:
            self.budgets = [b for b in self.budgets if b <= most] or [2]
        elif any(b > most for b in self.budgets):
            raise ValueError(f"budget {max(self.budgets)} spends the probe and {max(self.budgets) - 1} more samples, "
                             f"more than the pool's {self.pool.k} per prompt (--samples)")
        if self.test_split is None and (self.report_dir or self.live or self.compare_model):
            raise ValueError("--report, --live and --compare-model need --test-split")
        if self.test_split is None:
            read_only_with(self, ("test_prompts",), "--test-split")
        if not self.live:
            read_only_with(self, ("live_prompts", "live_budget"), "--live")
        if "auto" in self.live and self.live_budget < min(self.budgets):
            # auto follows the policy's row for the largest tuned budget that fits: known now, not after both pools.
            raise ValueError(f"--live auto: --live-budget {self.live_budget} is below the smallest tuned budget "
                             f"{min(self.budgets)}, so the policy has no row to follow; give --live-budget "
                             f">= {min(self.budgets)} or tune --budget {self.live_budget} too")
        self._held_out()
        if self.compare_model is not None:
            from edge_adapt.engine.gguf_file import inspect_gguf

            inspect_gguf(self.compare_model)  # a bad file fails now, not after the tuning
        return self

    def _held_out(self) -> None:
        """The tuning never sees the test prompts: a test split is another split of a suite that has splits."""
        from edge_adapt.tasks import check_split, has_splits

        suite = self.pool.family or self.pool.suite
        if not has_splits(self.pool.suite, self.pool.family):
            if "split" in self.pool.model_fields_set:  # given (tune-policy's own default is validation)
                check_split(self.pool.suite, self.pool.split, "validation", self.pool.family)
            if self.test_split is not None:
                raise ValueError(f"suite {suite!r} has no splits (a file is read whole, whatever --split says): "
                                 "--test-split would report on the prompts the policy was tuned on; leave it out "
                                 "and keep your test prompts in a file of their own, or tune on a suite with splits "
                                 "(arith, mix, --family NAME" + (", e.g. --family gsm8k" if suite == "gsm8k" else "") + ")")
            return
        if self.pool.split == "test":
            raise ValueError("--split test: a policy is never tuned on the test split (tune on validation or train)")
        if self.test_split is not None and self.test_split == self.pool.split:
            raise ValueError(f"--test-split {self.test_split} is the split the policy is tuned on (--split): "
                             "give another one (test)")


def _mean_ci(x: np.ndarray) -> tuple[float, float, float]:
    lo, hi = bootstrap_ci(x.tolist())
    return float(x.mean()), lo, hi


def tune_job(cfg: TuneConfig) -> Job[dict[str, Any]]:
    """Tune, write the policy, and (with a test split) the report, yielding Progress while sampling. Returns the
    report's JSON. A failed or interrupted run takes back the folders it created (the cache keeps any samples
    it holds)."""
    from edge_adapt.fileio import check_output_dir, check_replaceable, removed_on_failure

    check_target(cfg.out, force=cfg.force)
    check_output_dir(cfg.pool.cache_dir, force=False, reuse=True)
    if cfg.report_dir is not None:
        check_output_dir(cfg.report_dir, force=cfg.force)
        check_replaceable(cfg.report_dir)
    if cfg.pool.n_prompts < 2 * N_BINS:  # known before sampling, not after it
        raise UsageError(f"tuning needs at least {2 * N_BINS} prompts, got --prompts {cfg.pool.n_prompts}")
    held = len(suite_for(cfg.pool).problems)  # a suite file may hold fewer than --prompts asks for
    if held < 2 * N_BINS:
        raise UsageError(f"tuning needs at least {2 * N_BINS} prompts, and suite {cfg.pool.family or cfg.pool.suite!r} "
                         f"holds {held}")
    reports = [cfg.report_dir] if cfg.report_dir is not None else []
    # The policy is published last, with the report: a run stopped after tuning leaves none (live `auto` reads it
    # from its temp file).
    with removed_on_failure(*reports, cfg.pool.cache_dir, keep=[cfg.pool.cache_dir]), \
            atomic_file(cfg.out, force=cfg.force) as policy_file:
        return (yield from _tune(cfg, policy_file))


def _tune(cfg: TuneConfig, policy_file: Path) -> Job[dict[str, Any]]:
    pcfg = cfg.pool
    tcfg = pcfg.model_copy(update={"split": cfg.test_split, "n_prompts": cfg.test_prompts}) if cfg.test_split else None
    suites = [suite_for(pcfg)] + ([suite_for(tcfg)] if tcfg is not None else [])
    # `auto` runs live with the policy this job writes: its engine size is known once the policy is.
    backend = pool_backend(pcfg, suites, [live_config(cfg, pcfg, name, policy_file) for name in cfg.live
                                          if name != "auto"])
    if cfg.live and not isinstance(backend, LocalBackend):  # `auto` alone is not in the list above
        backend.close()
        raise UsageError("live strategy runs happen in process: --live cannot be combined with --backend")
    report: dict[str, Any] = {}
    with backend:
        run, identity = yield from pools_job(pcfg, backend, suites[0])
        pools = run.pools
        points = pool_settings(pcfg, suites[0]).prune_points
        # Named as auto names the scorer it runs with, to refuse another; a server's scoring by its identity.
        self_eval = self_eval_name(getattr(backend, "scorer", None)) or identity.split("|selfeval=", 1)[1]
        policy, tables = tune.tune(pools, model=backend.fingerprint, self_eval=self_eval,
                                   prune_points=points, temperature=pcfg.temperature, budgets=cfg.budgets,
                                   tolerance=cfg.tolerance, seed=pcfg.seed,
                                   source=f"{pcfg.suite} {pcfg.split} ({len(pools)} prompts, K={pcfg.k})")
        cv = {b: tune.cross_validate(t, b, cfg.tolerance, seed=pcfg.seed) for b, t in tables.items()}
        policy.tuning["cross_validation"] = {
            str(b): {"accuracy": round(c.accuracy, 4), "tokens": round(c.mean_tokens, 1)} for b, c in cv.items()}
        policy_file.write_text(policy.dumps())
        report = {"policy": str(cfg.out), "tuning": policy.tuning, "bin_edges": policy.bin_edges,
                  "choices": {str(b): [c.describe() for c in row] for b, row in policy.budgets.items()}}
        if tcfg is not None:
            test_run, _ = yield from pools_job(tcfg, backend, suites[1])
            report["test"] = held_out(policy, test_run.pools, points, pcfg.seed)
            report["test"]["params"] = backend.info.n_params
            if cfg.live and isinstance(backend, LocalBackend):
                report["live"] = yield from live_runs(backend.engine, backend.scorer, tcfg, cfg, policy_file,
                                                      test_run.pools)
    if cfg.compare_model is not None and tcfg is not None:
        report["compare"] = yield from compare_model(cfg.compare_model, tcfg)
    if cfg.report_dir is not None and "test" in report:
        with report_dir(cfg.report_dir) as tmp:
            report["plots"] = write_plots(report, tmp)
            (tmp / "report.json").write_text(report_json(report))
            (tmp / "report.md").write_text(markdown(report))
    return report


run_tune = to_the_end(tune_job)


def held_out(policy: Policy, pools: list[PromptPool], points: tuple[int, ...], seed: int) -> dict[str, Any]:
    """The policy replayed on the test pools, each budget beside best-of-N / weighted best-of-N / vote at N =
    budget (their tokens include no probe), and per bin: the choice and how the main candidates fare there."""
    k = min(len(p.samples) for p in pools)
    greedy = rp.greedy(pools)
    out: dict[str, Any] = {"prompts": len(pools), "greedy": greedy.accuracy, "greedy_tokens": greedy.mean_tokens,
                           "prompt_tokens": float(np.mean([p.prompt_tokens for p in pools])), "budgets": {}, "curves": {}}
    ns = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= k} | {k})
    curves = {"best-of-n": [rp.best_of_n(pools, n, "self-eval") for n in ns],
              "weighted-best-of-n": [rp.vote(pools, n, weighted=True, seed=seed) for n in ns],
              "majority-vote": [rp.vote(pools, n, weighted=False, seed=seed) for n in ns]}
    out["curves"] = {name: [[r.n_budget, r.accuracy, r.mean_tokens] for r in rows] for name, rows in curves.items()}
    ref = curves["weighted-best-of-n"][-1]
    out["reference"] = {"name": f"weighted best-of-{ref.n_budget}", "accuracy": ref.accuracy,
                        "tokens": ref.mean_tokens, "ci": list(ref.ci(seed))}
    for b in policy.budgets:
        if b > k + 1:
            continue
        got = tune.apply(policy, pools, b, points, seed)
        correct, tokens, bins = got.correct, got.tokens, got.bins
        acc, lo, hi = _mean_ci(correct)
        n = min(b, k)
        per_bin = []
        table = tune.build_table(pools, b, points, float(policy.tuning.get("temperature", 0.7)), seed)
        keys = [tune.choice_key(c) for c in table.choices]
        for bin_ in range(1, N_BINS + 1):
            idx = [i for i in range(len(pools)) if bins[i] == bin_]
            row = {"bin": bin_, "prompts": len(idx), "choice": policy.budgets[b][bin_ - 1].describe()}
            if idx:
                row["accuracy"] = float(correct[idx].mean())
                row["tokens"] = float(tokens[idx].mean())
                best = int(np.argmax(table.correct[:, idx].mean(axis=1)))
                row["best_on_test"] = keys[best]
                row["best_on_test_accuracy"] = float(table.correct[best, idx].mean())
                row["levels"] = {str(lv): int(sum(1 for i in idx if pools[i].level == lv))
                                 for lv in sorted({pools[i].level for i in idx if pools[i].level is not None})}
            per_bin.append(row)
        diff = correct - np.asarray(ref.correct)
        d_lo, d_hi = bootstrap_ci(diff.tolist(), seed=seed)
        bon = rp.best_of_n(pools, n, "self-eval")
        wbon = rp.vote(pools, n, weighted=True, seed=seed)
        out["budgets"][str(b)] = {
            "auto": {"accuracy": acc, "ci": [lo, hi], "tokens": float(tokens.mean()),
                     "selfeval_tokens": float(got.selfeval_tokens.mean()),
                     "minus_reference": float(diff.mean()), "minus_reference_ci": [d_lo, d_hi]},
            "best-of-n": {"accuracy": bon.accuracy, "ci": list(bon.ci(seed)), "tokens": bon.mean_tokens},
            "weighted-best-of-n": {"accuracy": wbon.accuracy, "ci": list(wbon.ci(seed)), "tokens": wbon.mean_tokens},
            "per_bin": per_bin,
        }
    top = max(b for b in policy.budgets if b <= k + 1) if any(b <= k + 1 for b in policy.budgets) else None
    if top is not None:
        out["bin_curves"] = bin_curves(pools, policy, top, points, seed)
    return out


def bin_curves(pools: list[PromptPool], policy: Policy, budget: int, points: tuple[int, ...],
               seed: int) -> dict[str, dict[str, list[list[float]]]]:
    """Per difficulty bin (the policy's bins) and strategy family: (tokens, accuracy) of every candidate at this
    budget, sorted by tokens: which strategy wins where, and at what cost."""
    table = tune.build_table(pools, budget, points, float(policy.tuning.get("temperature", 0.7)), seed)
    bins = np.array([policy.bin_of(p.greedy.end_score) for p in pools])
    out: dict[str, dict[str, list[list[float]]]] = {}
    for b in range(1, N_BINS + 1):
        idx = np.flatnonzero(bins == b)
        if not len(idx):
            continue
        fams: dict[str, list[list[float]]] = {}
        for c, choice in enumerate(table.choices):
            fams.setdefault(choice.strategy, []).append(
                [float(table.tokens[c, idx].mean()), float(table.correct[c, idx].mean())])
        out[str(b)] = {f: sorted(v) for f, v in fams.items()}
    return out


def live_config(cfg: TuneConfig, tcfg: EvalConfig, name: str, policy_file: Path) -> StrategyConfig:
    """How strategy `name` runs live: the live budget, the pool's sampling, seeds no pool used (auto: the policy
    this job writes, in `policy_file`). One strategy config serves every prompt, so a mix without --max-tokens runs
    live with its longest family budget."""
    from edge_adapt.strategies import registry

    suite = suite_for(tcfg)
    max_tokens = tcfg.max_tokens or suite.longest_budget()
    extra: dict[str, Any] = {"policy": str(policy_file)} if name == "auto" else {}
    if "prune_at" in registry.STRATEGIES[name].reads:  # TuneConfig checked the name
        # It prunes where the pool was scored (--prune-at, or the defaults below the reply budget), not at the
        # strategy's own default of 32, which a budget of 32 tokens or fewer never reaches.
        points = [p for p in pool_settings(tcfg, suite).prune_points if p < max_tokens]
        if not points:
            raise UsageError(f"--live {name} prunes at the pool's prune points, and none is below max_tokens "
                             f"{max_tokens}: give --prune-at below it")
        extra["prune_at"] = points
    return StrategyConfig.parse({
        "strategy": name, "budget": cfg.live_budget, "max_tokens": max_tokens, "temperature": tcfg.temperature,
        "seed": LIVE_SEED, **extra,
    }, f"live {name}")


def live_runs(engine: Engine, scorer: Any, tcfg: EvalConfig, cfg: TuneConfig, policy_file: Path,
              pools: list[PromptPool]) -> Job[list[dict[str, Any]]]:
    """Strategies run for real on the first `live_prompts` test prompts (auto with the policy just written to
    `policy_file`)."""
    suite = suite_for(tcfg)
    n = min(cfg.live_prompts, len(suite.problems))
    problems = list(suite.problems[:n])
    out = []
    for name in cfg.live:
        config = live_config(cfg, tcfg, name, policy_file)
        budget = cfg.live_budget
        if name == "auto":  # its policy exists now: grow the engine if a bin's choice holds more
            longest = max((prompt_tokens(engine, list(p.messages)) for p in suite.problems), key=len)
            ensure(engine, for_strategy(engine, longest, config)[0])
            # It follows the policy's largest row that fits: its row is labelled with what it could spend.
            budget = Policy.load(policy_file).row_for(budget)[0]
        outcomes: list[StrategyOutcome] = []
        for o in run_strategy_live(engine, scorer, suite, problems, config):
            outcomes.append(o)
            yield Progress(f"live {name} budget {budget}", len(outcomes), n,
                           f"acc {np.mean([x.correct for x in outcomes]):.2f}")
        right = sum(o.correct for o in outcomes)
        row: dict[str, Any] = {
            "strategy": name, "budget": budget, "prompts": n, "accuracy": right / n, "ci": list(wilson(right, n)),
            "tokens": float(np.mean([o.tokens for o in outcomes])),
            "samples": float(np.mean([o.samples for o in outcomes])),
            "selfeval_tokens": float(np.mean([o.selfeval_tokens for o in outcomes])),
            "wall_s": float(np.mean([o.wall_s for o in outcomes])),
            "per_level": {str(lv): float(np.mean([o.correct for o in outcomes if o.level == lv]))
                          for lv in sorted({o.level for o in outcomes if o.level is not None})},
        }
        if name == "auto":
            row["bins"] = {str(b): sum(1 for o in outcomes if o.difficulty_bin == b) for b in range(1, N_BINS + 1)}
        out.append(row)
    # the same prompts replayed, for comparison
    sub = pools[:n]
    for label, r in (("best-of-n (replay)", rp.best_of_n(sub, min(cfg.live_budget, len(sub[0].samples)), "self-eval")),
                     ("weighted-best-of-n (replay)", rp.vote(sub, min(cfg.live_budget, len(sub[0].samples)), weighted=True)),
                     ("greedy (replay)", rp.greedy(sub))):
        out.append({"strategy": label, "budget": r.n_budget, "prompts": n, "accuracy": r.accuracy, "ci": list(r.ci()),
                    "tokens": r.mean_tokens, "samples": r.mean_samples, "selfeval_tokens": r.mean_selfeval_tokens})
    return out


def compare_model(path: Path, tcfg: EvalConfig) -> Job[dict[str, Any]]:
    """Another model (a larger one, typically) answering every test prompt once, greedily: its accuracy and its
    compute."""
    from edge_adapt.engine import GREEDY, EngineOptions, Vocab
    from edge_adapt.result import collect

    suite = suite_for(tcfg)
    with Vocab(path) as vocab:
        prompts = [prompt_tokens(vocab, list(p.messages)) for p in suite.problems]
    right, tokens = 0, []
    size = for_generation(max(prompts, key=len), 1, suite.longest_budget(tcfg.max_tokens))
    with load_engine(size, EngineOptions(model=path, threads=tcfg.threads)) as big:
        for i, (p, ids) in enumerate(zip(suite.problems, prompts)):
            (answer,) = collect(big.generate(ids, GREEDY, max_tokens=p.budget(tcfg.max_tokens))).samples
            right += bool(suite.scorer_of(p).correct(answer.text, p.answer))
            tokens.append(answer.tokens)
            yield Progress(f"compare {path.name} greedy", i + 1, len(suite.problems))
        params = big.info.n_params
        fingerprint = big.fingerprint
    n = len(suite.problems)
    return {"model": str(path), "fingerprint": fingerprint, "params": params, "prompts": n, "accuracy": right / n,
            "ci": list(wilson(right, n)), "tokens": float(np.mean(tokens)),
            "flops": 2.0 * params * float(np.mean(np.add(tokens, [len(x) for x in prompts])))}


def flops(params: int, prompt_tokens: float, tokens: float, selfeval_tokens: float = 0.0) -> float:
    """Compute as 2 x parameters x tokens processed (prompt once, generated, self-eval suffixes)."""
    return 2.0 * params * (prompt_tokens + tokens + selfeval_tokens)


def verdict(t: dict[str, Any]) -> list[str]:
    """Where auto stands against the reference: its best within half the reference's tokens, and the first
    budget at which it reaches the reference's accuracy."""
    ref = t["reference"]
    rows = [(b, row["auto"]) for b, row in t["budgets"].items()]
    out = []
    half = [(b, a) for b, a in rows if a["tokens"] <= 0.5 * ref["tokens"]]
    if half:
        b, a = max(half, key=lambda x: x[1]["accuracy"])
        out.append(f"- Within half of {ref['name']}'s tokens, auto does best at budget {b}: {a['accuracy']:.3f}, "
                   f"{a['minus_reference']:+.3f} against it (paired 95% CI {a['minus_reference_ci'][0]:+.3f} … "
                   f"{a['minus_reference_ci'][1]:+.3f}), with {a['tokens'] / ref['tokens']:.2f} of its tokens.")
    reach = [(b, a) for b, a in rows if a["accuracy"] >= ref["accuracy"]]
    if reach:
        b, a = reach[0]
        out.append(f"- auto first reaches {ref['name']}'s accuracy at budget {b} ({a['accuracy']:.3f}), with "
                   f"{a['tokens'] / ref['tokens']:.2f} of its tokens.")
    else:
        out.append(f"- auto does not reach {ref['name']}'s accuracy at any tuned budget.")
    return out + [""]


def markdown(r: dict[str, Any]) -> str:
    t = r["test"]
    lines = [
        "# Compute-optimal policy (`auto`)", "",
        f"- policy: `{r['policy']}`, tuned on {r['tuning']['source']}; tolerance {r['tuning']['tolerance']}",
        "- difficulty: the greedy probe's p_keep; bin edges (bin 1 = easiest, p >= the last edge): "
        + ", ".join(f"{e:.3f}" for e in r["bin_edges"]),
        *_test_lines(t),
        "", "## Accuracy and generated tokens per prompt, by budget (replayed on the test pool)", "",
        *_budget_table(t),
    ]
    lines += ["", "Best-of-N and weighted best-of-N use N = budget samples (at most the pool's K) and no probe; auto's "
              "tokens include its probe.", ""]
    lines += verdict(t)
    lines += ["", "Cross-validation on the tuning prompts (two folds, each chosen on the other): " + ", ".join(
        f"budget {b}: {v['accuracy']:.3f} at {v['tokens']:.0f} tokens" for b, v in r["tuning"]["cross_validation"].items()), ""]
    lines += ["## Which strategy wins where (per difficulty bin, test prompts)", ""]
    for b, row in t["budgets"].items():
        lines += [f"### budget {b}", "", "| bin | prompts | levels | policy's choice | its accuracy | tokens | best on test (hindsight) |",
                  "|---|---|---|---|---|---|---|"]
        for x in row["per_bin"]:
            if not x["prompts"]:
                lines.append(f"| {x['bin']} | 0 | | {x['choice']} | | | |")
                continue
            lv = " ".join(f"L{k}:{v}" for k, v in x["levels"].items())
            lines.append(f"| {x['bin']} | {x['prompts']} | {lv} | {x['choice']} | {x['accuracy']:.3f} | {x['tokens']:.0f} | "
                         f"{x['best_on_test']} ({x['best_on_test_accuracy']:.3f}) |")
        lines.append("")
    if r.get("live"):
        lines += ["## Live runs (real generation through `run_strategy`, fresh seeds)", "", *_live_table(r["live"]), ""]
    if r.get("compare"):
        # Any model is accepted: the heading says "larger" only of one that is.
        other = "a larger" if r["compare"]["params"] > t["params"] else "another"
        lines += [f"## Compute-matched comparison with {other} model", "", *_compare_section(r), ""]
    if r.get("plots"):
        lines += [f"![{p}]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def summary(r: dict[str, Any]) -> str:
    """The held-out comparison in short, for a run that writes no report: the test pool and the reference, auto
    against best-of-N by budget, the verdict, and the live and compared runs when there are any."""
    t = r["test"]
    lines = ["held-out test (replayed on the test pool):", *_test_lines(t), "", *_budget_table(t), "", *verdict(t)]
    if r.get("live"):
        lines += ["live runs on the test prompts:", "", *_live_table(r["live"]), ""]
    if r.get("compare"):
        lines += _compare_section(r) + [""]
    return "\n".join(lines).rstrip("\n")


def _test_lines(t: dict[str, Any]) -> list[str]:
    ref = t["reference"]
    return [f"- test: {t['prompts']} prompts the tuning never saw; greedy {t['greedy']:.3f} at {t['greedy_tokens']:.0f} tokens",
            f"- reference: {ref['name']} {ref['accuracy']:.3f} ({ref['ci'][0]:.3f}–{ref['ci'][1]:.3f}) at {ref['tokens']:.0f} tokens"]


def _budget_table(t: dict[str, Any]) -> list[str]:
    """Accuracy and generated tokens per prompt of auto, best-of-N and weighted best-of-N, by budget."""
    ref = t["reference"]
    lines = [
        "| budget | auto | tokens | best-of-N | tokens | weighted best-of-N | tokens | auto − reference (paired 95% CI) | auto tokens / reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, row in t["budgets"].items():
        a, bo, w = row["auto"], row["best-of-n"], row["weighted-best-of-n"]
        lines.append(f"| {b} | {a['accuracy']:.3f} ({a['ci'][0]:.3f}–{a['ci'][1]:.3f}) | {a['tokens']:.0f} | "
                     f"{bo['accuracy']:.3f} | {bo['tokens']:.0f} | {w['accuracy']:.3f} | {w['tokens']:.0f} | "
                     f"{a['minus_reference']:+.3f} ({a['minus_reference_ci'][0]:+.3f} … {a['minus_reference_ci'][1]:+.3f}) | "
                     f"{a['tokens'] / ref['tokens']:.2f} |")
    return lines


def _live_table(live: list[dict[str, Any]]) -> list[str]:
    lines = ["| strategy | budget | prompts | accuracy | 95% CI | tokens | samples | self-eval tokens | s/prompt |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in live:
        wall = f"{x['wall_s']:.2f}" if "wall_s" in x else "replayed"
        lines.append(f"| {x['strategy']} | {x['budget']} | {x['prompts']} | {x['accuracy']:.3f} | "
                     f"{x['ci'][0]:.3f}–{x['ci'][1]:.3f} | {x['tokens']:.0f} | {x['samples']:.1f} | "
                     f"{x['selfeval_tokens']:.0f} | {wall} |")
    return lines


def _compare_section(r: dict[str, Any]) -> list[str]:
    t, c = r["test"], r["compare"]
    lines = [f"`{c['model']}` ({c['params'] / 1e6:.0f}M parameters) answers each test prompt once, greedily. "
             "Compute is 2 × parameters × tokens processed (prompt once, generated tokens, self-eval suffixes).", "",
             "| who | accuracy | 95% CI | GFLOPs per prompt |", "|---|---|---|---|",
             f"| {c['fingerprint']} greedy | {c['accuracy']:.3f} | {c['ci'][0]:.3f}–{c['ci'][1]:.3f} | {c['flops'] / 1e9:.1f} |"]
    for b, row in t["budgets"].items():
        a = row["auto"]
        f = flops(t["params"], t["prompt_tokens"], a["tokens"], a["selfeval_tokens"])
        lines.append(f"| auto, budget {b} | {a['accuracy']:.3f} | {a['ci'][0]:.3f}–{a['ci'][1]:.3f} | {f / 1e9:.1f} |")
    return lines


def short_label(choice: str) -> str:
    """'prune budget=7 k=1 prune_at=[32] temperature=0.7' -> 'prune 7→1 @32' (for plot cells)."""
    name, *rest = choice.split()
    o = dict(x.split("=", 1) for x in rest)
    if name == "prune":
        return f"prune {o['budget']}→{o['k']} @{o['prune_at'].strip('[]')}"
    if name == "adaptive":
        return f"adaptive ≤{o['budget']}\np≥{o['threshold']}"
    if "budget" in o:
        return f"{name}\nN={o['budget']}"
    return name


def write_plots(r: dict[str, Any], out_dir: Path) -> list[str]:
    from edge_adapt.eval.plots import pyplot

    plt = pyplot()
    if plt is None:
        return []
    t = r["test"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in t["curves"].items():
        ax.plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (N = 1 … {pts[-1][0]})")
    autos = [(v["auto"]["tokens"], v["auto"]["accuracy"], b) for b, v in t["budgets"].items()]
    ax.plot([a[0] for a in autos], [a[1] for a in autos], marker="*", markersize=12, color="black", label="auto (policy)")
    for x, y, b in autos:
        ax.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.axhline(t["greedy"], color="gray", linestyle=":", label="greedy")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per prompt")
    ax.set_ylabel("accuracy (test)")
    ax.set_title("compute-optimal policy vs best-of-N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "auto_vs_best_of_n.png", dpi=120)
    plt.close(fig)
    names = ["auto_vs_best_of_n.png"]
    if t.get("bin_curves"):
        curves = t["bin_curves"]
        from matplotlib.ticker import NullFormatter

        fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 3.6), sharey=True)
        axes = np.atleast_1d(axes)
        marks = {"probe": "s", "best-of-n": "o", "weighted-best-of-n": "^", "vote": "v", "adaptive": "D", "prune": "x"}
        for ax, (b, fams) in zip(axes, curves.items()):
            for fam, pts in fams.items():
                ax.plot([q[0] for q in pts], [q[1] for q in pts], marker=marks.get(fam, "."), label=fam,
                        linestyle="-" if len(pts) > 1 else "none")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"bin {b}" + (" (easiest)" if b == "1" else " (hardest)" if b == str(N_BINS) else ""), fontsize=9)
            ax.set_xlabel("tokens per prompt", fontsize=8)
        axes[0].set_ylabel("accuracy (test)")
        axes[-1].legend(fontsize=7)
        fig.suptitle("every candidate per difficulty bin (test prompts): which strategy wins where", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / "bins_accuracy_vs_tokens.png", dpi=120)
        plt.close(fig)
        names.append("bins_accuracy_vs_tokens.png")
    budgets = list(t["budgets"])
    if budgets:
        # The choice map: budgets down, bins across, one colour per strategy family, accuracy in each cell.
        families = sorted({row["choice"].split()[0] for b in budgets for row in t["budgets"][b]["per_bin"]})
        grid = np.array([[families.index(row["choice"].split()[0]) for row in t["budgets"][b]["per_bin"]]
                         for b in budgets])
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(budgets) + 1.6))
        cmap = plt.get_cmap("tab10", len(families))
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(families) - 0.5, aspect="auto")
        for y, b in enumerate(budgets):
            for x, row in enumerate(t["budgets"][b]["per_bin"]):
                acc = f"\nacc {row['accuracy']:.2f}" if row.get("prompts") else ""
                ax.text(x, y, short_label(row["choice"]) + acc, ha="center", va="center", fontsize=7)
        bins = t["budgets"][budgets[0]]["per_bin"]
        ax.set_xticks(range(len(bins)), [f"bin {x['bin']} ({x['prompts']})" for x in bins])
        ax.set_yticks(range(len(budgets)), [f"budget {b}" for b in budgets])
        ax.set_title("the policy's choice per difficulty bin (1 = easiest) and budget, accuracy on test")
        fig.tight_layout()
        fig.savefig(out_dir / "per_bin.png", dpi=130)
        plt.close(fig)
        names.append("per_bin.png")
    return names
