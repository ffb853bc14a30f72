"""Atomic file output: a temporary file beside the target, renamed only once complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from edge_adapt.errors import EdgeAdaptError, UsageError


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file; on any failure nothing is left behind and the old file stays.

    An existing file is replaced only with `force`.
    """
    target = Path(path)
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    if target.exists() and target.is_dir():
        raise UsageError(f"{target} is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    except FileNotFoundError:
        raise UsageError(f"{target.parent}: no such directory") from None
    except PermissionError:
        raise UsageError(f"{target.parent}: permission denied") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise EdgeAdaptError(f"{target}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
