"""PNG plots for the report (matplotlib, Agg backend; optional: `pip install edge-adapt[plots]`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from edge_adapt.eval.report import Report, StrategyRow

_CURVES = ("best-of-n by=self-eval", "best-of-n by=logprob", "best-of-n by=oracle", "majority-vote", "weighted-vote",
           "prune")


def _family(row: StrategyRow, k: int) -> str:
    """One curve per strategy family; adaptive rows split by start (greedy or a sample) and budget below K. The
    perfect judge's rows are one curve across budgets: it has no threshold, so its budget is what moves it."""
    if row.strategy == "best-of-n":
        return f"best-of-n {row.setting.split()[0]}"
    if row.strategy == "adaptive":
        if row.setting.startswith("by=oracle"):
            return "adaptive by=oracle first=greedy"
        budget = next((w for w in row.setting.split() if w.startswith("max=")), f"max={k}")
        return " ".join(["adaptive"] + (["first=greedy"] if row.setting.endswith("first=greedy") else [])
                        + ([budget] if budget != f"max={k}" else []))
    return row.strategy


def _curves(rows: list[StrategyRow], x: str, k: int) -> dict[str, list[tuple[float, float, float, float]]]:
    out: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for r in rows:
        fam = _family(r, k)
        if fam in _CURVES or fam.startswith("adaptive"):
            out[fam].append((getattr(r, x), r.accuracy, r.ci_low, r.ci_high))
    return {k: sorted(v) for k, v in out.items()}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """Write the PNGs next to report.md and return their file names (nothing when matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    names = []
    greedy = next((r for r in report.strategies if r.strategy == "greedy"), None)

    for x, label, fname in (("mean_samples", "average samples per prompt", "accuracy_vs_samples.png"),
                            ("mean_tokens", "average generated tokens per prompt", "accuracy_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        # More families than the default ten colours: ten strong ones, then their light twins.
        ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
        for fam, pts in _curves(report.strategies, x, report.k).items():
            xs, ys, lo, hi = zip(*pts)
            style = "--" if "oracle" in fam else "-"
            line, = ax.plot(xs, ys, style, marker="o", ms=3, label=fam)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.08)
        if greedy:
            ax.axhline(greedy.accuracy, color="grey", lw=0.8, ls=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{report.suite} {report.split}: accuracy vs compute (K={report.k})")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        names.append(fname)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, pts in _curves([r for r in report.strategies if r.gain_recovered is not None], "mean_samples", report.k).items():
        if "oracle" in fam:
            continue
        gains = {(r.mean_samples, r.accuracy): r.gain_recovered for r in report.strategies}
        xs = [p[0] for p in pts]
        ys = [gains[(p[0], p[1])] for p in pts]
        ax.plot(xs, ys, marker="o", ms=3, label=fam)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("average samples per prompt")
    ax.set_ylabel(f"share of best-of-{report.k} gain recovered")
    ax.set_title("gain recovered vs compute (1 = best-of-K by self-eval, 0 = greedy)")
    if len(ax.get_lines()) > 2:  # more than the two reference lines: no curves when best-of-K does not beat greedy
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "best-of-K does not beat greedy: no gain to recover", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "gain_recovered.png", dpi=120)
    plt.close(fig)
    names.append("gain_recovered.png")

    allc = next((c for c in report.calibration if c.scope == "all"), None)
    if allc and allc.bins:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.bar([(b.lo + b.hi) / 2 for b in allc.bins], [b.accuracy for b in allc.bins], width=0.09, alpha=0.6,
               label="accuracy in bin")
        ax.plot([b.mean_score for b in allc.bins], [b.accuracy for b in allc.bins], "o-", color="C3", label="mean p_keep")
        for b in allc.bins:
            ax.annotate(str(b.count), ((b.lo + b.hi) / 2, b.accuracy), fontsize=7, ha="center", va="bottom")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("self-eval p_keep")
        ax.set_ylabel("share of replies correct")
        ax.set_title(f"reliability: AUROC {allc.auroc if allc.auroc is None else round(allc.auroc, 3)}, "
                     f"ECE {allc.ece:.3f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "reliability.png", dpi=120)
        plt.close(fig)
        names.append("reliability.png")

    levels = sorted(report.levels, key=lambda s: int(s) if s.isdigit() else 0)
    if levels:
        pick = [r for r in report.strategies if r.strategy == "greedy" or r.setting in (
            "by=self-eval N=1", f"by=self-eval N={report.k}", f"by=oracle N={report.k}", f"N={report.k}")]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / max(1, len(pick))
        for i, r in enumerate(pick):
            ax.bar([j + i * width for j in range(len(levels))], [r.per_level.get(lv, 0) for lv in levels], width,
                   label=f"{r.strategy} {r.setting}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"level {lv}" for lv in levels])
        ax.set_ylabel("accuracy")
        ax.set_title("per-level accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "per_level.png", dpi=120)
        plt.close(fig)
        names.append("per_level.png")
    return names
