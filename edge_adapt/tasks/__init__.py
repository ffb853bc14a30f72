"""Task suites: problems with reference answers and the scorers that check replies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_adapt.errors import UsageError
from dataclasses import replace

from edge_adapt.tasks.arith import LEVELS, arith_problems, arith_suite
from edge_adapt.tasks.base import ANSWER_FORMAT, SPLITS, Problem, Suite
from edge_adapt.tasks.family import Family, GeneratedFamily, family_suite, mix_suite
from edge_adapt.tasks.files import GSM8K_DEFAULT, gsm8k_suite, jsonl_suite
from edge_adapt.tasks.gsm8k import Gsm8kFamily
from edge_adapt.tasks.registry import FAMILIES
from edge_adapt.tasks.scorers import (
    ExactMatch, FinalNumber, RegexMatch, Scorer, StatedNumber, Weekday, extract_final_number, extract_stated_number,
    extract_weekday, normalize_number, resolve_scorer,
)


def get_family(name: str, path: Path | None = None) -> Family:
    """A family by name; `path` is the gsm8k family's data file (the shared training split by default)."""
    if name not in FAMILIES:
        raise UsageError(f"unknown family {name!r}: choose from {', '.join(FAMILIES)}")
    fam = FAMILIES[name]
    return replace(fam, path=path) if path is not None and isinstance(fam, Gsm8kFamily) else fam


def has_splits(name: str, family: str | None = None) -> bool:
    """Whether `--split` picks problems for this suite: the generated ones and families do; a file suite (`gsm8k`,
    a .jsonl) is the whole file in order, whatever split is asked for."""
    return family is not None or not (name == "gsm8k" or name == "jsonl" or name.endswith(".jsonl"))


def check_data(name: str, path: Path | None, family: str | None = None) -> None:
    """`path` (--data) only where a suite reads it: GSM8K's file for `gsm8k`, `mix` and `--family gsm8k`, or the
    file of `--suite jsonl` (a .jsonl suite names its own; --data may only name the same one). A file given and
    never read would leave the user believing their data was used."""
    if path is None:
        return
    if family is not None:
        if family != "gsm8k":
            raise UsageError(f"--data is gsm8k's file; family {family!r} generates its problems and reads none")
        return
    if name in ("gsm8k", "mix", "jsonl"):
        return
    if name.endswith(".jsonl"):
        if Path(name).resolve() != Path(path).resolve():
            raise UsageError(f"--suite {name} and --data {path} name two different files: give the suite file once")
        return
    raise UsageError(f"--data is read by --suite gsm8k, --suite mix and --family gsm8k (GSM8K's file); "
                     f"suite {name!r} reads none")


def check_split(name: str, split: str, default: str, family: str | None = None) -> None:
    """`split` (--split) only where the suite has splits: a file suite is read whole, so a split other than the
    command's `default` would be ignored in silence, leaving the user believing they labelled that split."""
    if split != default and not has_splits(name, family):
        raise UsageError(f"--split {split}: suite {name!r} has no splits (a file is read whole, whatever split is "
                         "asked for); leave --split out, or keep the prompts of each split in a file of their own")


def load_suite(
    name: str, *, split: str = "test", n: int | None = None, path: Path | None = None,
    scorer: str | None = None, seed: int = 0, levels: Sequence[int] | None = None, family: str | None = None,
) -> Suite:
    """A suite by name: 'arith' (generated; `levels` picks some of its levels), 'gsm8k' (a GSM8K-format file,
    `path` or the shared training split, in file order), 'mix' (every family, interleaved; `path` is gsm8k's
    data), or 'jsonl' / any path ending in .jsonl (a user suite; `scorer` defaults to final-number).
    `family` picks one family instead (`levels` some of its levels); `name` must then be 'arith' (the default)
    or the family itself."""
    if scorer is not None and not (name == "jsonl" or name.endswith(".jsonl")):
        raise UsageError(f"--scorer applies to a .jsonl suite; suite {family or name!r} scores with its own")
    check_data(name, path, family)
    if family is not None:
        if name not in ("arith", family):
            raise UsageError(f"suite {name!r} and family {family!r} both pick a suite: give one of them")
        return family_suite(get_family(family, path), split, n or 200, seed, tuple(sorted(set(levels or ()))))
    if levels and name != "arith":
        raise UsageError(f"suite {name!r} has no levels: levels belong to a family (arith or --family NAME)")
    if name == "mix":
        return mix_suite([get_family(f, path) for f in FAMILIES], split, n or 200, seed)
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
    raise UsageError(f"unknown suite {name!r}: use arith, gsm8k, mix or a .jsonl file "
                     f"(one family: --family {'|'.join(FAMILIES)})")


__all__ = [
    "ANSWER_FORMAT", "LEVELS", "SPLITS", "GSM8K_DEFAULT", "FAMILIES", "Family", "GeneratedFamily", "Gsm8kFamily",
    "Problem", "Suite", "Scorer", "FinalNumber", "ExactMatch", "RegexMatch", "StatedNumber", "Weekday", "arith_problems",
    "arith_suite", "check_data", "check_split", "family_suite", "get_family", "gsm8k_suite", "has_splits", "jsonl_suite", "load_suite", "mix_suite",
    "extract_final_number", "extract_stated_number", "extract_weekday", "normalize_number", "resolve_scorer",
]
