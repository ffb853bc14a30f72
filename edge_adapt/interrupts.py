"""Ctrl-C for the command line: handled once, at the entry point, the same way for every command.

Two phases. While the package and the CLI import (before anything is created) Ctrl-C ends the process at
once with one line: a KeyboardInterrupt there would print a traceback from inside some import. Inside
`entry_point()` (`cli.main()`, `python -m edge_adapt.eval`), Ctrl-C raises KeyboardInterrupt as usual, so `with`
blocks and `finally` clauses take back what they created, and the entry point prints one line and exits 130.

One case needs care: llama.cpp calls back into Python (its log callback) while it loads a model or
quantizes. A KeyboardInterrupt raised inside a ctypes callback is printed as "Exception ignored" and lost.
When the signal lands there it is remembered instead and delivered again shortly, once control is back in
Python; `check()` raises it at points that must not be passed with an interrupt pending (publishing an
output).

Only the standard library is imported here (`entry_point` imports the rest when it is entered): the package
imports this module before anything else.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_CODE = 130
MESSAGE = "interrupted"
UNEXPECTED_EXIT_CODE = 70  # a bug, not bad input: one line, the traceback only on request
# Functions llama.cpp calls through ctypes; an exception raised in them never reaches the caller.
CALLBACKS = frozenset({"_log_callback"})

_pending: list[int] = []  # the signal that landed inside a callback, to deliver again


class Terminated(KeyboardInterrupt):
    """SIGTERM: the process is being stopped. A KeyboardInterrupt, so everything that cleans up after Ctrl-C
    cleans up after it; a REPL that takes Ctrl-C back at its prompt (chat) lets this one through."""


def _inside_callback(frame: FrameType | None) -> bool:
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name in CALLBACKS:
            return True
        frame = frame.f_back
    return False


def _redeliver() -> None:
    if _pending:
        os.kill(os.getpid(), _pending[-1])


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


_held: list[bool] = []  # inside `held()`: an interrupt waits for the block's end
_raised: list[int] = []  # the signal of each interrupt raised so far (see `not_swallowed`)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    if _held:
        _pending.append(signum)
        return
    if _inside_callback(frame):
        _pending.append(signum)
        timer = threading.Timer(0.05, _redeliver)
        timer.daemon = True
        timer.start()
        return
    _pending.clear()
    _raised.append(signum)
    raise _interrupt(signum)


@contextmanager
def not_swallowed() -> Iterator[None]:
    """Library code that can swallow an interrupt raised inside it: safetensors turns a KeyboardInterrupt raised
    while it builds a tensor into a ValueError ("could not determine the shape of object type ..."), which would
    end the command as a corrupt file. An interrupt raised in the block and lost there is raised again in place of
    the block's exception."""
    before = len(_raised)
    try:
        yield
    except Exception:
        if len(_raised) > before:
            raise _interrupt(_raised[-1]) from None
        raise


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"{MESSAGE}\n".encode())
    os._exit(EXIT_CODE)


def check() -> None:
    """Raise the interrupt that arrived while llama.cpp had control, if one did."""
    if _pending:
        signum = _pending[-1]
        _pending.clear()
        raise _interrupt(signum)


@contextmanager
def held() -> Iterator[None]:
    """A few steps that must happen all or none (renames that publish several outputs): Ctrl-C or SIGTERM inside
    waits until they are done and then stays pending, raised by the next `check()` (the entry point's, once the
    command is over), so what was published stays whole."""
    _held.append(True)
    try:
        yield
    finally:
        _held.pop()


class _Output:
    """A command's sys.stdout: an OSError writing it (a full disk, a pipe whose reader left) is marked as the
    output's, so that the entry point ends with one line instead of calling it a bug."""

    def __init__(self, stream: object) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)  # type: ignore[attr-defined, no-any-return]
        except OSError as exc:
            exc.lost_output = True  # type: ignore[attr-defined]
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()  # type: ignore[attr-defined]
        except OSError as exc:
            exc.lost_output = True  # type: ignore[attr-defined]
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _drop_output() -> None:
    """Point the lost standard output at /dev/null, so that the interpreter's own flush at exit does not fail
    on what is left in its buffer."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):
        pass


def install() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt (never inside a llama.cpp callback), and so does SIGTERM: a
    desktop app or a service manager stopping a command gets what Ctrl-C gets (what the command created taken
    back, exit 130), not a process killed with half-written output folders. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise_interrupt)
        signal.signal(signal.SIGTERM, _raise_interrupt)


def install_early_if_cli() -> None:
    """When this process is the `edge-adapt` command, Ctrl-C during the imports exits 130 with one line.

    A library user's process is left alone: only the command's own start (the console script, or
    `python -m edge_adapt` / `python -m edge_adapt.cli` / `python -m edge_adapt.eval`) is recognised.
    """
    argv = getattr(sys, "orig_argv", sys.argv)
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    as_module = any(a == "-m" and b in ("edge_adapt", "edge_adapt.cli", "edge_adapt.eval") for a, b in zip(argv, argv[1:]))
    if (script in ("edge-adapt", "edge-adapt.exe") or as_module) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_now)


@contextmanager
def entry_point(debug: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """The outermost frame of a command (`cli.main()`, `python -m edge_adapt.eval`), the same for each: Ctrl-C
    and SIGTERM raise KeyboardInterrupt inside it (`install`), and it ends the process with one line on stderr:
    an EdgeAdaptError as `error: MESSAGE` and its exit code, an interrupt as `interrupted` and 130, anything
    else as `error: unexpected ...` and 70, with the traceback instead when `debug()` (the `--debug` flag)."""
    from edge_adapt.engine.events import Cancelled  # imported late: this module stays standard-library only
    from edge_adapt.errors import EdgeAdaptError

    install()
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _Output(stdout)  # type: ignore[assignment]
    try:
        try:
            yield
            check()
            if stdout is not None:
                sys.stdout.flush()  # what is still buffered fails here, inside, not at the interpreter's exit
        finally:
            sys.stdout = stdout  # the command is over: a second Ctrl-C must not cut its last line short, nor one while the
            # interpreter shuts down (atexit) print a traceback
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except EdgeAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Cancelled):  # Cancelled: Ctrl-C stopped a decode outside generation
        print(MESSAGE, file=sys.stderr)
        sys.exit(EXIT_CODE)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if getattr(exc, "lost_output", False):  # a full disk, a closed pipe: no bug of ours
            if not isinstance(exc, BrokenPipeError):  # `| head` ends the command quietly, as any Unix filter's
                print(f"error: cannot write to standard output: {exc.strerror or exc}", file=sys.stderr)
            _drop_output()
            sys.exit(1)
        if debug():
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        sys.exit(UNEXPECTED_EXIT_CODE)
