"""`edge-adapt chat` as a person or a program drives it: lines on standard input, signals, errors on stderr."""

from __future__ import annotations

import io
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import assert_one_line_error, cli
from test_hostile import inproc, one_error


def test_sigterm_at_the_prompt_ends_the_chat():
    """Ctrl-C at the prompt drops the line being typed; SIGTERM (a desktop app or a service manager stopping it)
    was taken the same way, and the chat went on waiting for input."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    terminal, stdin = pty.openpty()  # the prompt is shown on a terminal only
    p = subprocess.Popen([sys.executable, "-m", "edge_adapt", "chat", "--threads", "2"], stdin=stdin,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.close(stdin)
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
        os.close(terminal)


def test_a_line_that_is_not_utf8_is_dropped_alone_and_errors_go_to_stderr():
    """Under a strict stdin decoder (Python's default in most locales) a bad line took the buffered lines after
    it with it: /help and the rest were never read."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "edge_adapt", "chat", "--threads", "2"], capture_output=True,
                          timeout=300, env=env, input=b"hello \xff\xfe world\n/help\n/strategy best-of-n \xc2\xb2\n/exit\n")
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, err  # the dropped line went unanswered (was 0: a script could not tell)
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


def _chat(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, lines: bytes, *args: str) -> tuple[int, str, str]:
    """`edge-adapt chat ARGS` in this process, its turns piped in."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    return inproc(capsys, "chat", "--threads", "2", *args)


def _reply(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0, err
    return out.split("\n", 1)[1].strip()  # after the banner


def test_chat_keeps_the_config_files_settings_where_no_flag_is_given(tmp_path: Path, capsys, monkeypatch):
    """chat's own defaults (512 tokens, seed 0, temperature 0.7 ...) replaced the file's, as if given as flags."""
    def reply(seed: int, *flags: str) -> str:
        config = tmp_path / f"seed{seed}.toml"
        config.write_text(f'strategy = "single"\nmax_tokens = 6\ntemperature = 1.0\nseed = {seed}\n')
        return _reply(_chat(capsys, monkeypatch, b"Name an animal and say why.\n", "--config", str(config), *flags))

    a, b = reply(7), reply(100)
    assert a != b  # the file's seeds
    assert len(a.split()) <= 6 and len(b.split()) <= 6  # the file's max_tokens
    assert reply(7, "--temp", "0") == reply(100, "--temp", "0")  # a flag given wins: greedy, whatever the seed


def test_chat_refuses_its_system_message_from_standard_input_which_carries_its_turns(capsys, monkeypatch):
    """`--system -` read every piped turn as the system message, and the chat answered nothing."""
    one_error(_chat(capsys, monkeypatch, b"What is 2+2?\nWhat is 3+3?\n", "--system", "-"),
              "standard input, which carries the chat's turns")


def test_a_piped_chat_shows_no_prompts_and_exits_non_zero_when_a_message_failed(capsys, monkeypatch):
    """The `> ` prompts were glued to the replies on stdout, and a script could not tell a turn had failed."""
    rc, out, err = _chat(capsys, monkeypatch, ("word " * 3000 + "\nSay hi.\n/help\n").encode(), "--ctx", "256",
                         "--max-tokens", "8")
    assert rc == 1
    assert err.startswith("error: this message (") and len(err.splitlines()) == 1, err
    banner, reply, *rest = out.splitlines()
    assert banner.startswith("edge-adapt chat: ") and reply.strip()  # "Say hi." was answered
    assert "commands:" in rest and not any(line.startswith(">") for line in out.splitlines())


def test_chat_config_policy_is_read_beside_the_file(tmp_path: Path, capsys, monkeypatch):
    """`policy = "p.json"` in a --config file was read from the current directory (`cannot read policy p.json`),
    though `[self_eval] adapter` in the same file is the file's neighbour. A setting for another strategy is
    kept for /strategy, as chat's flags are."""
    from edge_adapt.engine.default_model import default_policy

    shipped = default_policy()
    if shipped is None:
        pytest.skip("no policy shipped with this install")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "p.json").write_bytes(shipped.read_bytes())
    (tmp_path / "cfg" / "auto.toml").write_text('strategy = "auto"\nbudget = 2\npolicy = "p.json"\nmax_tokens = 4\n'
                                                'beam_width = 2\n')
    monkeypatch.chdir(tmp_path)
    assert _reply(_chat(capsys, monkeypatch, b"What is 2+3?\n", "--config", "cfg/auto.toml"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("-s", "best-of-n", "--budget", "2", "--threshold", "0.3"), "error: --threshold is not used by strategy best-of-n"),
        (("-s", "adaptive", "--budget", "2", "--temp", "0.3"), "error: --temp is not used by strategy adaptive"),
        (("-s", "vote", "--budget", "2", "--adapter", "none"), "error: --adapter is not used by strategy vote"),
        (("-s", "single", "--budget", "4"), "error: --budget is not used by strategy single"),
        (("-s", "best-of-n", "--budget", "255"), "its largest budget is 254"),
        (("--system", ""), "error: --system is empty"),
    ],
)
def test_chat_refuses_flags_its_starting_strategy_would_ignore(args: tuple[str, ...], fragment: str, capsys,
                                                               monkeypatch):
    """chat answered and ignored them, where run refuses them; an empty --system was dropped in silence."""
    one_error(_chat(capsys, monkeypatch, b"hi\n", "--max-tokens", "8", "--ctx", "256", *args), fragment, code=2)


def test_chat_keeps_strategy_flags_for_strategy_and_names_its_own_fixes(capsys, monkeypatch):
    """Without -s, strategy flags are what /strategy starts from (--prune-at: chat had none, so short replies
    could not be pruned); refusals named -n, which chat does not have, or `unify the KV`."""
    rc, out, err = _chat(capsys, monkeypatch, b"/strategy prune\nhi\n", "--max-tokens", "8", "--ctx", "256",
                         "--budget", "2", "--prune-at", "4")
    assert rc == 0 and "(strategy prune, budget 2;" in out, err
    rc, out, err = _chat(capsys, monkeypatch, b"/strategy best-of-n 255\n", "--max-tokens", "8", "--ctx", "256")
    assert err == ("error: strategy best-of-n with budget 255 holds 256 sequences at once (its samples and the "
                   "prompt's), more than one llama.cpp context holds (255): its largest budget is 254\n")
    # one sequence of 4096 tokens fits 600 MB, nine do not; in a process of its own, as the budget counts the
    # process's memory (this test process's holds what earlier tests imported, torch among them)
    assert_one_line_error(cli("chat", "--threads", "2", "--max-tokens", "8", "--mem-budget", "600MB", "-s",
                              "best-of-n", "--budget", "8", stdin=b"hi\n"), "(lower --budget or --ctx)")
