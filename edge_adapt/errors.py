"""One error hierarchy: the CLI turns each of these into a one-line message and a non-zero exit."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    M = TypeVar("M", bound=BaseModel)


class EdgeAdaptError(Exception):
    """An expected failure whose message is fit to show a user as it is. `field`: the setting it refuses, where
    one is to blame (a strategy's `budget`, its `policy`): the server names it as the error's `param`."""

    exit_code = 1

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class UsageError(EdgeAdaptError):
    """An option or configuration value is out of range or inconsistent."""

    exit_code = 2


class ModelFileError(EdgeAdaptError):
    """A model or adapter file is missing, unreadable, malformed or unsupported."""


class BudgetError(EdgeAdaptError):
    """The request does not fit the memory budget or the context window."""


class ContextOverflowError(BudgetError):
    """A prompt or a conversation is longer than the context can hold."""


class EngineError(EdgeAdaptError):
    """llama.cpp refused an operation (a failed decode, a state that would not restore)."""


def is_whole(v: Any) -> bool:
    """A whole number as a count or a token id must be: an int (a numpy integer too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A real number (int, float, a numpy number too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def not_a_bool(v: Any) -> Any:
    """A pydantic `before` validator for counts (and lists of them): pydantic reads True as 1, and a count given as
    a bool is a mistake."""
    if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
        raise ValueError(f"must be a whole number, got {v!r}")
    return v


def check_count(name: str, value: Any) -> None:
    """A count the caller gives (max_tokens, n): a whole number >= 1, or a UsageError saying so."""
    if not is_whole(value) or value < 1:
        raise UsageError(f"{name} must be a whole number >= 1, got {value!r:.40}")


def one_line(exc: ValidationError, what: str) -> str:
    """A pydantic error as one line: `what: field: message; field: message`. A message repeated at several
    places (one wrong strategy name in every cell of a policy) is said once, at its first place and a count of
    the others."""
    places: dict[str, list[str]] = {}  # message -> where, in pydantic's order
    for err in exc.errors():
        places.setdefault(err["msg"].removeprefix("Value error, "), []).append(".".join(str(x) for x in err["loc"]))
    parts = []
    for msg, locs in places.items():
        loc = locs[0] + (f" and {len(locs) - 1} more" if len(locs) > 1 else "")
        parts.append(f"{loc}: {msg}" if locs[0] else msg)
    return f"{what}: " + "; ".join(parts)


def validated(cls: type[M], data: Mapping[str, Any], what: str) -> M:
    """`cls` built from user-written settings, or a one-line UsageError naming `what`."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise UsageError(one_line(exc, what)) from None
