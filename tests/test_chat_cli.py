"""`edge-adapt chat` as a person or a program drives it: lines on standard input, signals, errors on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_cli import assert_one_line_error, cli


def test_sigterm_at_the_prompt_ends_the_chat():
    """Ctrl-C at the prompt drops the line being typed; SIGTERM (a desktop app or a service manager stopping it)
    was taken the same way, and the chat went on waiting for input."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edge_adapt", "chat", "--threads", "2"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out = b""
        end = time.monotonic() + 240
        while b"> " not in out and time.monotonic() < end:
            out += os.read(p.stdout.fileno(), 4096)  # type: ignore[union-attr]
        assert b"> " in out, out
        p.send_signal(signal.SIGINT)  # at the prompt: taken back, the chat goes on
        time.sleep(0.5)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        assert rc == 130 and p.stderr.read().decode().strip() == "interrupted"  # type: ignore[union-attr]
    finally:
        p.kill()
        p.wait()


def test_a_line_that_is_not_utf8_is_dropped_alone_and_errors_go_to_stderr():
    """Under a strict stdin decoder (Python's default in most locales) a bad line took the buffered lines after
    it with it: /help and the rest were never read."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "edge_adapt", "chat", "--threads", "2"], capture_output=True,
                          timeout=300, env=env, input=b"hello \xff\xfe world\n/help\n/strategy best-of-n \xc2\xb2\n/exit\n")
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "commands:" in out and "error" not in out  # /help was read; errors are not in the transcript
    assert err.splitlines() == ["error: this line is not valid UTF-8; it was ignored",
                                "error: /strategy NAME [BUDGET]: the budget is a whole number >= 1, got '²'"]


def test_a_chat_that_could_never_answer_is_refused_before_its_first_line():
    assert_one_line_error(cli("chat", "--ctx", "256", "--threads", "2", stdin=b"Hi\n"),
                          "a reply of up to 512 tokens after the")
    assert_one_line_error(cli("chat", "--adapter", "no-such-adapter.gguf", "--threads", "2", stdin=b"Hi\n"),
                          "no-such-adapter.gguf")  # refused at start, not at the first /strategy


def test_a_bare_command_prints_its_help_and_no_empty_error_line():
    proc = cli()
    assert proc.returncode == 2 and b"Commands" in proc.stdout and proc.stderr == b""
