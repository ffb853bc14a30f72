"""Every task family by name. A new family is one module in this package and one line here."""

from __future__ import annotations

from edge_adapt.tasks.arith import ARITH
from edge_adapt.tasks.compare import COMPARE
from edge_adapt.tasks.counting import COUNTING
from edge_adapt.tasks.dates import DATES
from edge_adapt.tasks.family import Family
from edge_adapt.tasks.gsm8k import GSM8K
from edge_adapt.tasks.sequence import SEQUENCE
from edge_adapt.tasks.steps import STEPS
from edge_adapt.tasks.units import UNITS
from edge_adapt.tasks.wordprob import WORDPROB

FAMILIES: dict[str, Family] = {f.name: f for f in (
    ARITH,
    WORDPROB,
    COMPARE,
    UNITS,
    COUNTING,
    SEQUENCE,
    DATES,
    STEPS,
    GSM8K,
)}


def family_named(problem_id: str) -> str | None:
    """The family a generated problem's id names (`units-L3-validation-7`), for records that keep only the id
    (label files). A user suite's ids may look the same: where the Problem is at hand, use its `family`."""
    head, sep, rest = problem_id.partition("-")
    return head if sep and head in FAMILIES and rest[:1] == "L" else None
