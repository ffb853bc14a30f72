"""Suites read from JSONL files: GSM8K-format (`question`, `answer` ending in `#### N`) and user suites
(`prompt` or `messages`, plus `answer`; optional `id` and `level`). Files are only ever read, never downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edge_adapt.engine.chat import Message
from edge_adapt.errors import UsageError, is_number, is_whole
from edge_adapt.fileio import read_user_file
from edge_adapt.tasks.base import ANSWER_FORMAT, Problem, Suite, user
from edge_adapt.tasks.scorers import FinalNumber, Scorer, reference_number, resolve_scorer

# Where the GSM8K training split sits beside a checkout (MIT licensed); users point at their own files.
GSM8K_DEFAULT = Path("../shared/data/gsm8k/train.jsonl")


def json_line(line: str, where: str) -> Any:
    """One line of a JSON Lines file, or a one-line UsageError naming `where` (its file and line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not JSON ({exc.msg})") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise UsageError(f"{where}: JSON nested too deeply") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Each non-blank line's JSON object, with its line number in the file (what error messages name)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"suite file {path} does not exist")
    rows = []
    # One line for a FIFO or bad UTF-8; split at "\n" only: a JSON string may hold U+2028, which splitlines() cuts at.
    # A byte-order mark is what some editors start UTF-8 files with: read past it, as utf-8-sig does.
    text = read_user_file(path, text=True).removeprefix("\ufeff")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row = json_line(line, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append((lineno, row))
    return rows


def gsm8k_suite(path: Path = GSM8K_DEFAULT, n: int | None = None, split: str = "file") -> Suite:
    """GSM8K-format problems in file order; the reference is the number after '####'."""
    out = []
    for i, (lineno, row) in enumerate(_read_jsonl(path)):
        if "question" not in row or "answer" not in row:
            raise UsageError(f"{path}:{lineno}: needs 'question' and 'answer'")
        ref = reference_number(str(row["answer"]))
        if ref is None:
            raise UsageError(f"{path}:{lineno}: the answer has no final number ('#### N')")
        out.append(Problem(f"gsm8k-{i}", user(f"{row['question']} {ANSWER_FORMAT}"), ref))
        if n is not None and len(out) == n:
            break
    return Suite("gsm8k", split, tuple(out), FinalNumber())


def _messages(row: dict, where: str) -> tuple[Message, ...]:
    """The problem's chat: `prompt` as one user message, or `messages` checked here, where the line is known."""
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise UsageError(f"{where}: prompt must be a string, got {row['prompt']!r:.40}")
        return user(row["prompt"])
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: bad chat message {m!r:.80}: needs role system/user/assistant and string content")
    if msgs[-1]["role"] != "user":  # what the model answers: a turn after an assistant's would answer nobody
        raise UsageError(f"{where}: the last message must be the user's, got the {msgs[-1]['role']}'s")
    return tuple(msgs)


def jsonl_suite(path: Path, scorer: Scorer | str = "final-number", n: int | None = None, name: str | None = None) -> Suite:
    """A user suite: each line has `prompt` (a user message) or `messages` (a chat), and `answer`."""
    sc = resolve_scorer(scorer) if isinstance(scorer, str) else scorer
    out = []
    # A problem twice would count twice and share its sample seeds (they derive from the id): refused.
    ids: dict[str, int] = {}
    texts: dict[str, int] = {}
    for i, (lineno, row) in enumerate(_read_jsonl(path)):
        where = f"{path}:{lineno}"
        if "answer" not in row or ("prompt" in row) == ("messages" in row):
            raise UsageError(f"{where}: needs 'answer' and exactly one of 'prompt' or 'messages'")
        answer = row["answer"]
        # null would be scored against the text "None"; NaN, Infinity (or 1e999, read as inf) against "nan", "inf"
        if not (isinstance(answer, str) or (is_number(answer) and math.isfinite(answer))):
            raise UsageError(f"{where}: answer must be a string or a finite number, got {answer!r:.40}")
        msgs = _messages(row, where)
        level = row.get("level")
        if isinstance(level, str) and level.strip().lstrip("-").isdigit():
            level = int(level)  # "3" is read as 3, as it always was
        if level is not None and not is_whole(level):
            raise UsageError(f"{where}: level must be a whole number (a difficulty), got {level!r:.40}")
        pid = row.get("id", f"{Path(path).stem}-{i}")
        if not (isinstance(pid, str) or is_whole(pid)):
            raise UsageError(f"{where}: id must be a string or a whole number, got {pid!r:.40}")
        problem = Problem(str(pid), msgs, str(answer), level)
        if problem.id in ids:
            raise UsageError(f"{where}: duplicate id {problem.id!r:.60} (first on line {ids[problem.id]})")
        if problem.text in texts:
            raise UsageError(f"{where}: duplicate prompt (first on line {texts[problem.text]})")
        ids[problem.id], texts[problem.text] = lineno, lineno
        out.append(problem)
        if n is not None and len(out) == n:
            break
    return Suite(name or Path(path).stem, "file", tuple(out), sc)
