"""Counterfactual answers: a sampled response with only its final number changed, labelled by the scorer.

On-policy labels at the hard arith levels are lopsided (7% of level 4 replies are right), and a right reply and
a wrong one usually differ in more than their answer ("4 + 8 + 3 = 15" against "The answer is 12."), so a
self-eval can score the form of a reply instead of checking it. Copies of a reply with another number put in
(the reference, or a near miss) make sets of replies that differ in the committed number alone: the score can
only tell them apart by doing the arithmetic.

Only numeric suites (the final-number scorer) can be edited this way. The copies are training data only:
validation and every reported number stay on-policy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from edge_adapt.errors import UsageError
from edge_adapt.tasks.scorers import FinalNumber, extract_final_number, numbers_in, reference_number
from edge_adapt.train.labels import LabelSet, target_against

# A number with an operator right beside it is an operand ("4 + 5"), not a stated result ("= 9", "is 9").
_OPERAND_AFTER = re.compile(r"\s*[-+*/×x−]\s*\d")
_OPERAND_BEFORE = re.compile(r"[-+*/×x−]\s*$")
# Where a counterfactual's sample index starts: far above any K, so it never names a real sample.
FIRST_INDEX = 1000


def swap_final_number(text: str, new: str) -> str | None:
    """`text` with the number it commits to replaced by `new` wherever that number is stated as a result;
    None when no result is found or the edited reply would commit to something else."""
    old = extract_final_number(text)
    if old is None:
        return None
    spans = [(lo, hi) for lo, hi, value in numbers_in(text)
             if value == old and not _OPERAND_AFTER.match(text, hi) and not _OPERAND_BEFORE.search(text[:lo])]
    if not spans:
        return None
    out = text
    for lo, hi in reversed(spans):
        out = out[:lo] + new + out[hi:]
    got = extract_final_number(out)
    return out if got is not None and Decimal(got) == Decimal(new) else None


def counterfactuals(record: dict[str, Any], tokenize: Callable[[str], list[int]], rng: random.Random,
                    limit: int) -> list[dict[str, Any]]:
    """Up to `limit` edited copies of one prompt's distinct whole responses, as label rows.

    A wrong reply gets the reference answer (now right) and a near miss (still wrong); a right one gets a near
    miss. A near miss is the reference +-1 or 2 that no sample of this prompt answered: like the reference in a
    wrong reply, a number the model did not choose. Were the wrong copies to take the model's own wrong answers,
    "an unlikely final number" would mean "right" in the copies, and the score would learn that instead."""
    reference = reference_number(str(record.get("answer", "")))
    if reference is None:
        return []
    scorer = FinalNumber()
    whole = [r for r in record["rows"] if r["cut"] is None and r.get("text") is not None]
    given = {a for r in whole if (a := extract_final_number(r["text"])) is not None}
    near = sorted({str(Decimal(reference) + d) for d in (-2, -1, 1, 2)} - given)
    others = [float(r["correct"]) for r in whole if r["sample"] >= 0]  # the K samples, not the greedy one
    seen = {r["text"] for r in whole}
    groups: list[list[str]] = []
    for text in sorted(seen):
        own = extract_final_number(text)
        news = ([] if own == reference else [reference]) + ([rng.choice(near)] if near else [])
        edits = [e for n in news if (e := swap_final_number(text, n)) is not None and e not in seen]
        seen.update(edits)
        if edits:
            groups.append(edits)
    rng.shuffle(groups)
    rows: list[dict[str, Any]] = []
    for text in (t for g in groups for t in g):
        if len(rows) == limit:
            break
        right = scorer.correct(text, reference)
        rows.append({"sample": FIRST_INDEX + len(rows), "cut": None, "ids": tokenize(text), "text": text,
                     "correct": right, "finish": "counterfactual",
                     "target": round(target_against(float(right), others), 6) if others else float(right)})
    return rows


def with_counterfactuals(labels: LabelSet, tokenize: Callable[[str], list[int]], per_prompt: int,
                         seed: int = 0) -> LabelSet:
    """`labels` with up to `per_prompt` counterfactual rows added to each prompt (see the module docstring)."""
    if labels.header.get("scorer") not in ("final-number", None):
        raise UsageError(f"counterfactual answers need a final-number suite; these labels are scored by "
                         f"{labels.header.get('scorer')!r}")
    rng = random.Random(seed)
    prompts = [{**rec, "rows": rec["rows"] + counterfactuals(rec, tokenize, rng, per_prompt)} for rec in labels.prompts]
    return LabelSet(labels.header, prompts)

