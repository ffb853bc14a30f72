"""User files in, outputs out.

Reading: `read_user_file` is the one way a command reads a file the user named. It opens without blocking
and checks that what it got is a regular file before reading a byte (a FIFO or a device would hang the
process, a directory gives odd errors), refuses files above a size limit, and decodes text as UTF-8.
`check_user_file` does the same checks for files handed by path to other code (llama.cpp, safetensors).

Writing: outputs appear only complete: temp file beside the target, then rename. The temp lives in the
target's directory because os.replace is only atomic within one filesystem. Any failure (disk full,
permission, Ctrl-C, a bug) removes the temp; an existing output survives unless `force` was given, and even
then it is replaced only once the new one is complete. `removed_on_failure` takes back what a command
created when it fails or is interrupted.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence as Seq
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from edge_adapt import interrupts
from edge_adapt.errors import EdgeAdaptError, ModelFileError, UsageError

MiB = 1 << 20
# Settings, policies and label sets are small; a larger file is a mistake, not data.
DEFAULT_MAX_BYTES = 256 * MiB


def _refuse(path: Path, why: str, error: type[EdgeAdaptError]) -> EdgeAdaptError:
    return error(f"{path}: {why}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def check_user_file(path: str | os.PathLike[str], *, max_bytes: int | None = None,
                    error: type[EdgeAdaptError] = UsageError) -> Path:
    """`path` names a regular file (symlinks followed) no larger than `max_bytes`; stat only, nothing opened."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _refuse(p, "no such file", error) from None
    except OSError as exc:
        raise _refuse(p, f"cannot read ({exc.strerror or exc})", error) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, _kind(st.st_mode), error)
    if max_bytes is not None and st.st_size > max_bytes:
        raise _refuse(p, f"too large ({st.st_size} bytes, at most {max_bytes} read)", error)
    return p


def read_user_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, text: bool = False,
                   error: type[EdgeAdaptError] = UsageError) -> Any:
    """The bytes (or, with `text`, the UTF-8 text) of a regular file the user named, or a one-line `error`.

    The file is opened non-blocking and checked with fstat on the open descriptor, so a FIFO swapped in
    after a check cannot hang the read.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _refuse(p, "no such file", error) from None
    except IsADirectoryError:
        raise _refuse(p, "is a directory", error) from None
    except OSError as exc:
        raise _refuse(p, f"cannot read ({exc.strerror or exc})", error) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, _kind(st.st_mode), error)
        if st.st_size > max_bytes:
            raise _refuse(p, f"too large ({st.st_size} bytes, at most {max_bytes} read)", error)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise _refuse(p, f"too large (more than {max_bytes} bytes)", error)
            chunks.append(chunk)
    except OSError as exc:
        raise _refuse(p, f"cannot read ({exc.strerror or exc})", error) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not text:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _refuse(p, f"not valid UTF-8 text (line {line}, byte {exc.start})", error) from None


def _in_the_way(path: Path, *, directory: bool) -> str | None:
    """Why what is at `path` may not be replaced by an output (a regular file, or with `directory` a directory),
    even with --force: a directory, a device or a FIFO replaced by a file is never what was asked for. None when
    nothing is there or it is of the output's kind. A symlink is judged by what it points to (a link to a regular
    file is replaced by the output, and what it points to is left alone; so is a dangling link, both with --force)."""
    try:
        mode = path.stat().st_mode
    except OSError:  # nothing there (or unreadable: creating the output will say why)
        return None
    if directory:
        return None if stat.S_ISDIR(mode) else "exists and is not a directory"
    return None if stat.S_ISREG(mode) else _kind(mode)


def check_target(path: Path, *, force: bool, directory: bool = False) -> None:
    """Refuse to clobber an existing output before any work is done. What is not of the output's kind (a file
    output naming a directory, a device, a FIFO) is refused even with `force` (_in_the_way)."""
    why = _in_the_way(path, directory=directory)
    if why is not None:
        raise UsageError(f"{path} {why}")
    if (path.exists() or path.is_symlink()) and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        existing = next((p for p in parent.parents if p.exists()), None) if not parent.exists() else parent
        if existing is not None and not existing.is_dir():  # -o out.jsonl/x.jsonl: it exists, as a file
            raise UsageError(f"cannot write {path}: {existing} is not a directory")
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):  # known now, not after the work that makes the output
        raise ModelFileError(f"cannot write {path}: permission denied")


def check_output_dir(path: Path, *, force: bool, reuse: bool = False) -> None:
    """Refuse, before any work is done, an output directory that cannot be written, or that holds earlier output
    (a non-empty one, unless `force`; `reuse`: a resumable cache, whose contents are what it is for)."""
    _real_dir(path)  # a dangling link or a loop is refused as such
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    if path.is_dir() and not (force or reuse) and any(path.iterdir()):
        raise UsageError(f"{path} already exists and is not empty; pass --force to overwrite it")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot make directory {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):  # also read-only file systems and immutable folders, for root
        raise ModelFileError(f"cannot write {path}: permission denied")


def os_error_message(path: Path, exc: OSError) -> str:
    """One line for the user; disk full and permission problems are the common ones."""
    # numpy's tofile reports a short write without an errno: the device stopped taking data.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (exc.errno is None and "requested and" in str(exc)):
        return f"cannot write {path}: no space left" + (f" ({exc.strerror})" if exc.strerror else "")
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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    except OSError as exc:
        raise ModelFileError(os_error_message(target, exc)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    _umask_mode(tmp)
    try:
        yield tmp
        interrupts.check()  # a Ctrl-C that arrived while llama.cpp wrote the file: publish nothing
        replace_path(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(os_error_message(target, exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _real_dir(path: Path) -> Path:
    """Where a directory output named `path` goes: `path`, or, where it is a symbolic link, what the link leads
    to. The link is kept and its target replaced, as most tools write through a link (`out -> /big/disk/out`
    puts outputs elsewhere on purpose); replacing the link would lose it and leave its target stale. A dangling
    link or a loop is refused with UsageError: there is no directory to write into."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a loop, before Python 3.13
        raise UsageError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist (or loops)") from None


def replace_path(new: Path, target: Path) -> None:
    """Rename `new` (a file or a directory) to `target`, in place of what is there. A directory cannot be replaced
    in one rename: the old one is parked beside it until the new one is in place, then removed. A directory
    replaces what a symbolic link at `target` leads to, the link staying (_real_dir); a file replaces the link
    itself. What is not of `new`'s kind is refused: checked again here, as it may have appeared while the output
    was made."""
    why = _in_the_way(target, directory=new.is_dir())
    if why is not None:
        raise UsageError(f"{target} {why}")
    if new.is_dir():
        target = _real_dir(target)
    if not target.is_dir():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent or "."))
    try:
        os.replace(target, old / "x")
    except OSError:
        old.rmdir()  # nothing was parked: no empty folder is left beside the target
        raise
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old / "x", target)  # the old directory back where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, carry: Callable[[str], bool]) -> None:
    """Entries of `old` that `new` lacks and `carry` accepts, linked (or copied) into `new`: the old directory is
    left whole until the swap, so a failure here loses nothing."""
    for entry in old.iterdir():
        dst = new / entry.name
        if dst.exists() or dst.is_symlink() or not carry(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))


def check_replaceable(path: Path, inputs: Seq[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any work, a directory output that holds the working directory or one of `inputs`: atomic_dir
    swaps the whole directory, so the process would go on in the one it took away, and an input inside it would
    be deleted with the rest (`import m/model.gguf -o m --force`). Symbolic links are followed on both sides, as
    what is replaced is where they lead."""
    where = Path(path).resolve()
    here = Path.cwd().resolve()
    if here.is_relative_to(where):
        raise UsageError(f"{path} holds the working directory: the output directory is replaced as a whole when "
                         "it is complete; name a directory below this one")
    for given in inputs:
        if Path(given).resolve().is_relative_to(where):
            raise UsageError(f"{path} holds the input {given}: the output directory is replaced as a whole when it "
                             "is complete, which would delete the input; move it out or name another output "
                             "directory")


def check_not_input(path: Path, inputs: Seq[str | os.PathLike[str] | None]) -> None:
    """Refuse, before any work, a file output that is one of `inputs` (None: not given) or an existing file inside
    an input directory (`convert hf -o hf/model.safetensors --force` replaced the weights it read): --force
    replaces an earlier output, never what the command reads. A new file written into an input directory is
    fine (llama.cpp's converter writes its GGUF beside the checkpoint). Symbolic links are followed on both
    sides (realpath, which also takes a link loop without raising: reading that input will say what is wrong)."""
    where = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        real = Path(os.path.realpath(given))
        if where == real or (where.is_relative_to(real) and os.path.lexists(where)):
            how = "is" if where == real else "is a file inside"
            raise UsageError(f"{path} {how} the input {given}; name an output the command does not read")


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False,
               carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Like atomic_file for a directory: filled under a temp name, swapped in only when complete. `carry`: which
    entries of an existing directory the new one keeps (by name; hard links, so nothing is copied), when it
    does not write them itself; without it, the old directory's contents go with it. A symbolic link at `path`
    stays, and the directory it leads to is the one replaced (_real_dir)."""
    target = Path(path)
    real = _real_dir(target)  # the temp goes beside what is replaced: a rename stays on one file system
    check_target(target, force=force, directory=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent or "."))
    except OSError as exc:
        raise ModelFileError(os_error_message(target, exc)) from None
    _umask_mode(tmp, 0o777)
    try:
        yield tmp
        interrupts.check()
        if carry is not None and real.is_dir():
            _carry_over(real, tmp, carry)
        replace_path(tmp, real)
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


def _snapshot(path: Path) -> set[str] | bool:
    """False: absent; True: a file; a set: a directory's entries."""
    if path.is_dir():
        return {p.name for p in path.iterdir()}
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _made_for(path: Path) -> Path:
    """What making `path` creates: its highest missing folder (`a` of a new `a/b/c`), or `path` itself."""
    made = path
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            break
        made = parent
    return made


def _take_back(path: Path, keep: list[Path]) -> None:
    """Remove what a failed command created at `path`, except work under a `keep` path: a kept folder goes only when
    it holds no file, and a folder that leads to one is emptied of everything else."""
    here = Path(os.path.abspath(path))
    kept = any(here.is_relative_to(k) for k in keep)
    if (kept or any(k.is_relative_to(here) for k in keep)) and path.is_dir() and not path.is_symlink():
        for entry in path.iterdir():
            _take_back(entry, keep)
        if not any(path.iterdir()):
            path.rmdir()
    elif not kept:
        _remove(path)


@contextmanager
def removed_on_failure(*paths: str | os.PathLike[str], keep: Seq[str | os.PathLike[str]] = ()) -> Iterator[None]:
    """If the block raises (Ctrl-C included), take back what it created at `paths`: a path that did not exist is
    removed, with the folders made above it for it, and so are the new entries of a directory that did. What
    existed before is never touched.

    `keep` names resumable caches: their files are work the next run reuses, so they stay wherever they lie (a
    cache inside a new report folder too) with the folders that lead to them; only what holds no file is removed.
    """
    targets = [_made_for(Path(p)) for p in paths]
    kept = [Path(os.path.abspath(k)) for k in keep]
    before = [_snapshot(p) for p in targets]
    try:
        yield
    except BaseException:
        for p, had in zip(targets, before):
            if had is True:
                continue
            created = [p] if had is False else [c for c in (p.iterdir() if p.is_dir() else ()) if c.name not in had]
            for c in created:
                _take_back(c, kept)
        raise
