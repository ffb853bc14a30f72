"""The evaluation report: pydantic models (an edge), built from replays and calibration; Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from edge_adapt.eval import metrics
from edge_adapt.eval.pool import PromptPool
from edge_adapt.eval.replay import Replay
from edge_adapt.tasks.base import Suite


def _written_by_a_report(path: Path) -> frozenset[str]:
    """The files of the report in `path` (report.md, report.json and the plots its report.json lists), which a
    new report replaces; any other file there is the user's, a PNG too. Without a readable report.json: only
    the two reports."""
    names = {"report.md", "report.json"}
    try:
        plots = json.loads((path / "report.json").read_text(encoding="utf-8")).get("plots", [])
        names |= {p for p in plots if isinstance(p, str)}
    except (OSError, ValueError, AttributeError):
        pass
    return frozenset(names)


def report_dir(path: Path) -> AbstractContextManager[Path]:
    """A temporary directory to write a report into, swapped in for `path` once every file is complete
    (fileio.atomic_dir): a run killed while writing leaves the old report whole, never a truncated PNG beside it.
    Whether `path` may be replaced was checked before the run (fileio.check_output_dir: a non-empty one only with
    --force). What the old directory holds besides the old report's own files is kept: notes, the policy file, a
    cache, the user's own PNGs."""
    from edge_adapt.fileio import atomic_dir

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    own = _written_by_a_report(Path(path))
    return atomic_dir(path, force=True, carry=lambda name: name not in own)


def report_json(data: Any) -> str:
    """report.json's text: strict JSON (an undefined metric is null, never NaN, which JSON parsers refuse)."""
    return json.dumps(data, indent=1, allow_nan=False)


class StrategyRow(BaseModel):
    strategy: str
    setting: str
    accuracy: float
    ci_low: float
    ci_high: float
    mean_samples: float
    mean_tokens: float
    mean_selfeval_tokens: float
    gain_recovered: float | None = None  # (acc - greedy) / (best-of-K by self-eval - greedy)
    per_level: dict[str, float] = {}
    # Adaptive from greedy only: what a right/wrong judge that resamples wrong greedy answers picked at random
    # reaches at this row's mean samples and budget (see judge_at), and the share of its gain over greedy this row
    # gets. A reference, not a bound: a score that resamples the prompts more samples can fix gets a share above 1.
    judge_accuracy: float | None = None
    judge_gain_share: float | None = None


class BinRow(BaseModel):
    lo: float
    hi: float
    count: int
    mean_score: float
    accuracy: float


class Calibration(BaseModel):
    scope: str  # "all" or "level N", "prune point P"
    n: int
    base_rate: float
    auroc: float | None
    auroc_ci: tuple[float, float] | None = None  # 95% bootstrap over prompts
    # Right above wrong among one prompt's replies only: what best-of-N and pruning can use (None: no prompt has both).
    within_prompt_auroc: float | None = None
    brier: float
    brier_constant: float
    ece: float
    bins: list[BinRow] = []


class LiveCheck(BaseModel):
    strategy: str
    setting: str
    prompts: int
    live_accuracy: float
    live_ci: tuple[float, float]
    replay_accuracy: float
    replay_ci: tuple[float, float]
    within_replay_ci: bool
    live_mean_samples: float
    replay_mean_samples: float
    live_mean_tokens: float
    replay_mean_tokens: float


class Report(BaseModel):
    title: str
    model: str  # the fingerprint
    selfeval: str
    suite: str
    split: str
    seed: int = 0  # picks the arith problems and every sample's seed
    model_file: str = ""  # the GGUF's file name (its path is local)
    prompts: int
    k: int
    temperature: float
    max_tokens: int | None  # None: each problem's family's own budget (a mix)
    prune_points: list[int]
    pool_file: str
    generation_wall_s: float
    prompts_generated: int
    tokens_generated: int
    levels: dict[str, int]
    strategies: list[StrategyRow]
    calibration: list[Calibration]
    live: list[LiveCheck] = []
    plots: list[str] = []
    notes: list[str] = []

    def markdown(self) -> str:
        return render_markdown(self)


def calibration(scope: str, groups: Sequence[tuple[list[float], list[bool]]], bins: bool = True) -> Calibration:
    """Calibration of scores against correctness; `groups` holds each prompt's (scores, labels)."""
    scores = [x for g in groups for x in g[0]]
    labels = [x for g in groups for x in g[1]]
    return Calibration(
        scope=scope, n=len(scores), base_rate=float(np.mean(labels)) if labels else 0.0,
        auroc=metrics.auroc(scores, labels), auroc_ci=metrics.auroc_ci(groups),
        within_prompt_auroc=metrics.within_prompt_auroc(groups),
        brier=metrics.brier(scores, labels), brier_constant=metrics.brier_constant(labels), ece=metrics.ece(scores, labels),
        bins=[BinRow(**b.__dict__) for b in metrics.reliability_bins(scores, labels)] if bins else [],
    )


def calibrations(pools: Sequence[PromptPool], prune_points: Sequence[int], suite: Suite) -> list[Calibration]:
    """End-score calibration over all sampled replies, per level, per task family when there are several (a mix:
    the family that made each of `suite`'s problems; a user's suite file has none, whatever its ids), and at each
    prune point (samples scored there)."""
    family = {p.id: p.family for p in suite.problems}
    def ends(ps: Sequence[PromptPool]) -> list[tuple[list[float], list[bool]]]:
        return [([s.end_score for s in p.samples], [s.correct for s in p.samples]) for p in ps]
    out = [calibration("all", ends(pools))]
    for lv in sorted({p.level for p in pools if p.level is not None}):
        out.append(calibration(f"level {lv}", ends([p for p in pools if p.level == lv])))
    families = sorted({f for f in (family.get(p.problem_id) for p in pools) if f is not None})
    if len(families) > 1:
        for fam in families:
            out.append(calibration(f"family {fam}", ends([p for p in pools if family.get(p.problem_id) == fam])))
    for i, pt in enumerate(prune_points):
        scored = [[s for s in p.samples if s.scores[i] is not None] for p in pools]
        groups = [([s.scores[i] for s in ss], [s.correct for s in ss]) for ss in scored if ss]
        if groups:
            out.append(calibration(f"prune point {pt} tokens", groups, bins=False))
    return out


def strategy_rows(replays: Sequence[Replay], pools: Sequence[PromptPool], seed: int = 0) -> list[StrategyRow]:
    levels = sorted({p.level for p in pools if p.level is not None})
    k = min(len(p.samples) for p in pools)
    base = next((r.accuracy for r in replays if r.strategy == "greedy"), None)
    top = next((r.accuracy for r in replays if r.setting == f"by=self-eval N={k}"), None)
    rows = []
    for r in replays:
        lo, hi = r.ci(seed)
        per = {}
        for lv in levels:
            idx = [i for i, p in enumerate(pools) if p.level == lv]
            per[str(lv)] = float(np.mean([r.correct[i] for i in idx]))
        gain = None
        if base is not None and top is not None and top - base > 1e-9:  # no gain to recover otherwise
            gain = (r.accuracy - base) / (top - base)
        judge = judge_at(r, replays)
        share = None
        if judge is not None and base is not None and judge - base > 1e-9:
            share = (r.accuracy - base) / (judge - base)
        rows.append(StrategyRow(strategy=r.strategy, setting=r.setting, accuracy=r.accuracy, ci_low=lo, ci_high=hi,
                                mean_samples=r.mean_samples, mean_tokens=r.mean_tokens,
                                mean_selfeval_tokens=r.mean_selfeval_tokens, gain_recovered=gain, per_level=per,
                                judge_accuracy=judge, judge_gain_share=share))
    return rows


def judge_at(row: Replay, replays: Sequence[Replay]) -> float | None:
    """The accuracy from greedy, at `row`'s mean samples and budget, of a right/wrong judge that picks at random
    which wrong greedy answers to resample: None unless `row` is adaptive from greedy by the score. The judge's
    own row (`by=oracle`, same budget) resamples every prompt whose greedy answer is wrong; this one gets the
    same gain over greedy in proportion to the extra samples, up to that row (linear interpolation).

    It is not the best a judge could do with fewer samples: one that also knew which prompts another sample
    would fix would do better, and so may the score (it tends to doubt the prompts of middling difficulty, where
    resampling pays), so `judge_gain_share` can exceed 1."""
    if row.strategy != "adaptive" or "first=greedy" not in row.setting or "by=oracle" in row.setting:
        return None
    greedy_row = next((r for r in replays if r.strategy == "greedy"), None)
    oracle = next((r for r in replays if r.strategy == "adaptive" and r.setting.startswith("by=oracle")
                   and r.n_budget == row.n_budget), None)
    if greedy_row is None or oracle is None or oracle.mean_samples <= 1.0:
        return None
    part = min(1.0, max(0.0, (row.mean_samples - 1.0) / (oracle.mean_samples - 1.0)))
    return greedy_row.accuracy + part * (oracle.accuracy - greedy_row.accuracy)


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def render_markdown(r: Report) -> str:
    lv = sorted(r.levels, key=lambda s: int(s) if s.isdigit() else 0)
    lines = [
        f"# {r.title}", "",
        f"- model: `{r.model_file}` (`{r.model}`)" if r.model_file else f"- model: `{r.model}`",
        f"- self-eval: `{r.selfeval}`",
        f"- suite: `{r.suite}` split `{r.split}` seed {r.seed}, {r.prompts} prompts"
        + (f" ({', '.join(f'level {k}: {v}' for k, v in sorted(r.levels.items()))})" if r.levels else ""),
        f"- pool: K={r.k} samples per prompt at temperature {r.temperature} + 1 greedy, max_tokens "
        f"{r.max_tokens if r.max_tokens is not None else 'each family its own'}, "
        f"prune points {r.prune_points}",
        (f"- generation: {r.prompts_generated} prompts generated ({r.tokens_generated} tokens) in "
         f"{r.generation_wall_s / 60:.1f} min"
         + (f", {r.prompts - r.prompts_generated} read from the cache" if r.prompts_generated < r.prompts else "")
         if r.prompts_generated else
         f"- generation: every prompt read from the cache (generating them took {r.generation_wall_s / 60:.1f} min)")
        + f"; pool file `{r.pool_file}`", "",
    ]
    for n in r.notes:
        lines.append(f"> {n}")
        lines.append("")
    for p in r.plots:
        lines.append(f"![{p}]({p})")
    lines += ["", "## Strategies (replayed over the pool)", "",
              "Accuracy with a 95% bootstrap interval over prompts; compute is the mean per prompt. "
              "`gain` is the share of best-of-K's (by self-eval) gain over greedy.", "",
              "| strategy | setting | accuracy | 95% CI | samples | tokens | self-eval tokens | gain |"
              + "".join(f" L{x} |" for x in lv),
              "|---|---|---|---|---|---|---|---|" + "---|" * len(lv)]
    for s in r.strategies:
        lines.append(
            f"| {s.strategy} | {s.setting} | {s.accuracy:.3f} | {s.ci_low:.3f}–{s.ci_high:.3f} | {s.mean_samples:.2f} | "
            f"{s.mean_tokens:.0f} | {s.mean_selfeval_tokens:.0f} | {_f(s.gain_recovered, 2)} |"
            + "".join(f" {s.per_level.get(x, float('nan')):.2f} |" for x in lv))
    judged = [s for s in r.strategies if s.judge_accuracy is not None]
    if judged:
        lines += ["", "## Adaptive sampling from greedy against a judge that resamples wrong greedy answers at random", "",
                  "The reference judge knows right from wrong but not which prompt another sample would fix: held to "
                  "the row's mean samples, it resamples a random share of the prompts whose greedy answer is wrong, so "
                  "its gain over greedy is its `by=oracle` row's (same budget) in proportion to the extra samples. "
                  "`share` is the row's gain over greedy as a share of that judge's. It is a reference, not a "
                  "ceiling: a score that spends its samples on the prompts they can fix gets a share above 1.",
                  "", "| setting | samples | accuracy | random-allocation judge | share |", "|---|---|---|---|---|"]
        lines += [f"| {s.setting} | {s.mean_samples:.2f} | {s.accuracy:.3f} | {s.judge_accuracy:.3f} | "
                  f"{_f(s.judge_gain_share, 2)} |" for s in judged]
    lines += ["", "## Calibration of the self-eval score (p_keep vs correctness of each sampled reply)", "",
              "AUROC's interval is a 95% bootstrap over prompts (a prompt's replies are resampled together). "
              "`within prompt` ranks only replies to the same prompt against each other (right above wrong): "
              "what best-of-N and pruning can use, where AUROC also credits telling easy prompts from hard ones.",
              "", "| scope | replies | base rate | AUROC | AUROC 95% CI | within prompt | Brier | Brier of constant | ECE |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in r.calibration:
        ci = f"{c.auroc_ci[0]:.3f}–{c.auroc_ci[1]:.3f}" if c.auroc_ci else "–"
        lines.append(f"| {c.scope} | {c.n} | {c.base_rate:.3f} | {_f(c.auroc)} | {ci} | {_f(c.within_prompt_auroc)} | "
                     f"{c.brier:.4f} | {c.brier_constant:.4f} | {c.ece:.3f} |")
    allc = next((c for c in r.calibration if c.scope == "all"), None)
    if allc and allc.bins:
        lines += ["", "Reliability (all replies):", "", "| p_keep bin | replies | mean p_keep | accuracy |", "|---|---|---|---|"]
        lines += [f"| {b.lo:.1f}–{b.hi:.1f} | {b.count} | {b.mean_score:.3f} | {b.accuracy:.3f} |" for b in allc.bins]
    if r.live:
        lines += ["", "## Live check (the replay's semantics run for real on fresh seeds, same prompts)", "",
                  "Live runs sample as the replay does (adaptive: greedy first, then the pool's one temperature; "
                  "threshold as replayed), so they check the replay against sampling noise, not what annealing the "
                  "temperature (`edge-adapt run --strategy adaptive`) changes.", "",
                  "| strategy | setting | prompts | live acc (95% Wilson) | replay acc (95% bootstrap) | live in replay CI | "
                  "samples live/replay | tokens live/replay |", "|---|---|---|---|---|---|---|---|"]
        for c in r.live:
            lines.append(
                f"| {c.strategy} | {c.setting} | {c.prompts} | {c.live_accuracy:.3f} ({c.live_ci[0]:.3f}–{c.live_ci[1]:.3f}) | "
                f"{c.replay_accuracy:.3f} ({c.replay_ci[0]:.3f}–{c.replay_ci[1]:.3f}) | {'yes' if c.within_replay_ci else 'NO'} | "
                f"{c.live_mean_samples:.2f} / {c.replay_mean_samples:.2f} | {c.live_mean_tokens:.0f} / {c.replay_mean_tokens:.0f} |")
    return "\n".join(lines) + "\n"
