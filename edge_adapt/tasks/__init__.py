"""Task suites: problems with reference answers and the scorers that check replies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_adapt.errors import UsageError
from edge_adapt.tasks.arith import LEVELS, arith_problems, arith_suite
from edge_adapt.tasks.base import ANSWER_FORMAT, SPLITS, Problem, Suite
from edge_adapt.tasks.files import GSM8K_DEFAULT, gsm8k_suite, jsonl_suite
from edge_adapt.tasks.scorers import (
    ExactMatch, FinalNumber, RegexMatch, Scorer, extract_final_number, normalize_number, resolve_scorer,
)


def load_suite(
    name: str, *, split: str = "test", n: int | None = None, path: Path | None = None,
    scorer: str | None = None, seed: int = 0, levels: Sequence[int] | None = None,
) -> Suite:
    """A suite by name: 'arith' (generated; `levels` picks some of its levels), 'gsm8k' (a GSM8K-format file,
    `path` or the shared training split), or 'jsonl' / any path ending in .jsonl (a user suite; `scorer` defaults
    to final-number)."""
    if levels and name != "arith":
        raise UsageError(f"levels are arith's; suite {name!r} has none")
    if name == "arith":
        unknown = sorted(set(levels or ()) - set(LEVELS))
        if unknown:
            raise UsageError(f"arith has levels {', '.join(map(str, LEVELS))}, not {unknown[0]}")
        return arith_suite(split, n or 200, seed, tuple(sorted(set(levels))) if levels else LEVELS)
    if name == "gsm8k":
        return gsm8k_suite(path or GSM8K_DEFAULT, n)
    if name == "jsonl" or name.endswith(".jsonl"):
        file = path or Path(name)
        return jsonl_suite(file, scorer or "final-number", n)
    raise UsageError(f"unknown suite {name!r}: use arith, gsm8k or a .jsonl file")


__all__ = [
    "ANSWER_FORMAT", "LEVELS", "SPLITS", "GSM8K_DEFAULT", "Problem", "Suite", "Scorer", "FinalNumber", "ExactMatch",
    "RegexMatch", "arith_problems", "arith_suite", "gsm8k_suite", "jsonl_suite", "load_suite",
    "extract_final_number", "normalize_number", "resolve_scorer",
]
