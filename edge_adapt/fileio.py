"""Write outputs so that a reader only ever sees a complete file: temp file beside the target, then rename.

The temp lives in the target's directory because os.replace is only atomic within one filesystem.
Any failure (disk full, permission, Ctrl-C, a bug) removes the temp; an existing output survives unless
`force` was given, and even then it is replaced only once the new one is complete.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from edge_adapt.errors import ModelFileError, UsageError


def check_target(path: Path, *, force: bool) -> None:
    """Refuse to clobber an existing output before any work is done."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist")


def os_error_message(path: Path, exc: OSError) -> str:
    """One line for the user; disk full and permission problems are the common ones."""
    # numpy's tofile reports a short write without an errno: the device stopped taking data.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (exc.errno is None and "requested and" in str(exc)):
        return f"cannot write {path}: no space left ({exc.strerror})"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied"
    return f"cannot write {path}: {exc.strerror or exc}"


def _umask_mode(path: Path, mode: int = 0o666) -> None:
    """mkstemp/mkdtemp create owner-only entries; the output should get the mode any new file gets."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it becomes `path`, on any exception it is deleted."""
    target = Path(path)
    check_target(target, force=force)
    if target.is_dir():
        raise UsageError(f"{target} is a directory")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    except OSError as exc:
        raise ModelFileError(os_error_message(target, exc)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    _umask_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(os_error_message(target, exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Like atomic_file for a directory: filled under a temp name, swapped in only when complete."""
    target = Path(path)
    check_target(target, force=force)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or "."))
    except OSError as exc:
        raise ModelFileError(os_error_message(target, exc)) from None
    _umask_mode(tmp, 0o777)
    try:
        yield tmp
        if target.exists():
            # A directory cannot be replaced in one rename; park the old one until the new one is in place.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent or "."))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelFileError(os_error_message(target, exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[BinaryIO]:
    """`atomic_file` for writers that want an open binary handle; flushed to disk before the rename."""
    with atomic_file(path, force=force) as tmp, open(tmp, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
