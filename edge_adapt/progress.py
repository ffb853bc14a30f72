"""Progress of long jobs (convert, import, train, eval, tune-policy, label) as events.

A job is a generator that yields `Progress` and returns its result; the library never draws anything. The CLI
renders the events as progress bars, an app as it likes, and `finish(job)` simply runs one to its result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Progress:
    """`done` of `total` steps of one task of a job (tasks are told apart by name). `info` is a short status
    (a rate, a loss); `message`, when set, is a line worth keeping (a validation result)."""

    task: str
    done: int
    total: int
    info: str = ""
    message: str | None = None


Job = Generator[Progress, None, T]


def finish(job: Job[T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Run a job to its end and return its result, handing each Progress to `on_progress` if given."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        if on_progress is not None:
            on_progress(event)


def to_the_end(job_fn: Callable[P, Job[T]]) -> Callable[P, T]:
    """The plain function of a job function: same arguments, runs the job and returns its result
    (`convert_model = to_the_end(convert_model_job)`)."""

    @functools.wraps(job_fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return finish(job_fn(*args, **kwargs))

    return run
