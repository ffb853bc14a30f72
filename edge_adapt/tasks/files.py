"""Suites read from JSONL files: GSM8K-format (`question`, `answer` ending in `#### N`) and user suites
(`prompt` or `messages`, plus `answer`; optional `id` and `level`). Files are only ever read, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from edge_adapt.errors import UsageError, is_whole
from edge_adapt.fileio import read_user_file
from edge_adapt.tasks.base import ANSWER_FORMAT, Problem, Suite, user
from edge_adapt.tasks.scorers import FinalNumber, Scorer, reference_number, resolve_scorer

# Where the GSM8K training split sits beside a checkout (MIT licensed); users point at their own files.
GSM8K_DEFAULT = Path("../shared/data/gsm8k/train.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"suite file {path} does not exist")
    rows = []
    # One line for a FIFO or bad UTF-8; split at "\n" only: a JSON string may hold U+2028, which splitlines() cuts at.
    for lineno, line in enumerate(read_user_file(path, text=True).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append(row)
    return rows


def gsm8k_suite(path: Path = GSM8K_DEFAULT, n: int | None = None, split: str = "file") -> Suite:
    """GSM8K-format problems in file order; the reference is the number after '####'."""
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        if "question" not in row or "answer" not in row:
            raise UsageError(f"{path}: line {i + 1} needs 'question' and 'answer'")
        ref = reference_number(str(row["answer"]))
        if ref is None:
            raise UsageError(f"{path}: line {i + 1}: the answer has no final number ('#### N')")
        out.append(Problem(f"gsm8k-{i}", user(f"{row['question']} {ANSWER_FORMAT}"), ref))
        if n is not None and len(out) == n:
            break
    return Suite("gsm8k", split, tuple(out), FinalNumber())


def jsonl_suite(path: Path, scorer: Scorer | str = "final-number", n: int | None = None, name: str | None = None) -> Suite:
    """A user suite: each line has `prompt` (a user message) or `messages` (a chat), and `answer`."""
    sc = resolve_scorer(scorer) if isinstance(scorer, str) else scorer
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        if "answer" not in row or ("prompt" in row) == ("messages" in row):
            raise UsageError(f"{path}: line {i + 1} needs 'answer' and exactly one of 'prompt' or 'messages'")
        if "prompt" in row:
            msgs = user(str(row["prompt"]))
        else:
            msgs = tuple(row["messages"])
            if not msgs or any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in msgs):
                raise UsageError(f"{path}: line {i + 1}: messages must be a list of {{role, content}}")
        level = row.get("level")
        if isinstance(level, str) and level.strip().lstrip("-").isdigit():
            level = int(level)  # "3" is read as 3, as it always was
        if level is not None and not is_whole(level):
            raise UsageError(f"{path}: line {i + 1}: level must be a whole number (a difficulty), got {level!r:.40}")
        out.append(Problem(str(row.get("id", f"{Path(path).stem}-{i}")), msgs, str(row["answer"]), level))
        if n is not None and len(out) == n:
            break
    return Suite(name or Path(path).stem, "file", tuple(out), sc)
