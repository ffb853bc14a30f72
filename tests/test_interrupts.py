"""Ctrl-C at several moments of every long command: exit 130, one line on stderr, nothing published, no temp
file. Each moment is chosen by waiting for a marker (llama.cpp's library mapped into the process: the imports
are under way; llama.cpp's own log: the model is loading; the first answer bytes; a temp file or folder
appearing), with every wait bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_adapt.engine.default_model import default_model_path
from edge_adapt.errors import ModelFileError

try:
    from convert_fixtures import llama_dir  # noqa: F401 (a fixture)
except ImportError:  # pragma: no cover
    pass

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="markers read /proc")


class Run:
    """A command in its own process, its stdout and stderr collected as they come."""

    def __init__(self, args: list[str], cwd: Path | None = None, module: str = "edge_adapt") -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, cwd=cwd)
        self.out, self.err = bytearray(), bytearray()
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:  # type: ignore[no-untyped-def]
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.extend(chunk)

    def wait_for(self, marker: Callable[[], bool], timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not marker():
            if self.p.poll() is not None:
                pytest.fail(f"the command ended (rc {self.p.returncode}) before the moment came: {bytes(self.err)[-2000:]!r}")
            if time.monotonic() > end:
                self.p.kill()
                pytest.fail("the moment never came")
            time.sleep(0.002)

    def interrupt(self, timeout: float = 120, signum: int = signal.SIGINT) -> tuple[int, str, str]:
        assert self.p.poll() is None, "the command had already ended"
        self.p.send_signal(signum)
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            pytest.fail(f"the interrupt was lost: still running {timeout} s after Ctrl-C")
        for t in self._threads:
            t.join(timeout=10)
        return rc, bytes(self.out).decode(errors="replace"), bytes(self.err).decode(errors="replace")

    def maps(self, name: str) -> Callable[[], bool]:
        def marker() -> bool:
            try:
                return name in Path(f"/proc/{self.p.pid}/maps").read_text()
            except OSError:
                return False
        return marker


def interrupted(result: tuple[int, str, str], *, verbose: bool = False) -> None:
    rc, _, err = result
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if verbose:  # llama.cpp's own log (or a finished step's line) comes first
        assert lines and lines[-1] == "interrupted", err[-3000:]
    else:
        assert lines == ["interrupted"], err[-3000:]


def no_temp_files(directory: Path) -> None:
    left = [p for p in directory.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]
    assert not left, left


# -- run -----------------------------------------------------------------------------------------------------
LONG = ["run", "Write a long story about a cat who learns to fly.", "--raw", "-n", "4", "--temp", "1",
        "--max-tokens", "2000", "--ctx", "2048"]


def test_run_interrupted_during_imports():
    r = Run(LONG)
    r.wait_for(r.maps("libllama"))
    interrupted(r.interrupt())


def test_run_interrupted_while_the_model_loads():
    r = Run([*LONG, "--verbose"])
    r.wait_for(lambda: b"llama_model_loader" in r.err)
    rc, out, err = r.interrupt()
    interrupted((rc, out, err), verbose=True)
    assert "sample 0" not in out  # the run did not go on to answer


def test_run_interrupted_mid_generation():
    r = Run(["run", "Write a long story about a cat who learns to fly.", "--max-tokens", "2000", "--temp", "1",
             "--ctx", "2048"])
    r.wait_for(lambda: len(r.out) > 0)
    interrupted(r.interrupt())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_mid_reply_ends_the_replys_line_first(signum: int):
    """On a terminal `interrupted` was glued to the partial reply ("A mooninterrupted")."""
    r = Run(["run", "Write a long poem about the moon.", "--max-tokens", "2000", "--temp", "1", "--ctx", "2048"])
    r.wait_for(lambda: len(r.out) > 0)
    rc, out, err = r.interrupt(signum=signum)
    interrupted((rc, out, err))
    assert out.strip() and out.endswith("\n"), out[-200:]


def test_run_with_a_strategy_interrupted_while_scoring():
    r = Run(["run", "What is 17 * 23?", "--strategy", "best-of-n", "--budget", "4", "--max-tokens", "200",
             "--temp", "1", "--show-scores"])
    r.wait_for(r.maps("libllama"))
    time.sleep(1.5)
    if r.p.poll() is None:
        interrupted(r.interrupt())


# -- convert / import ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def medium_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama of ~40M parameters (the fixture's tokenizer): big enough that converting takes a while."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("medium") / "hf"
    shutil.copytree(llama_dir, out)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    cfg = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": 768, "intermediate_size": 3072,
                                            "num_hidden_layers": 4, "num_attention_heads": 12, "num_key_value_heads": 4,
                                            "head_dim": 64}))
    model.save_pretrained(str(out))
    return out


def _tmp_appears(directory: Path, suffix: str) -> Callable[[], bool]:
    return lambda: any(p.name.endswith(suffix) for p in directory.iterdir())


@pytest.mark.parametrize("moment", ["imports", "writing", "quantizing"])
def test_convert_interrupted_publishes_nothing(moment: str, medium_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    r = Run(["convert", str(medium_dir), "-o", str(out / "m.gguf"), "--type", "q4_k_m"])
    if moment == "imports":
        r.wait_for(r.maps("libllama"))
    elif moment == "writing":
        r.wait_for(_tmp_appears(out, ".f16.tmp"))
    else:  # the f16 intermediate is complete once llama.cpp's quantizer starts writing the output temp
        r.wait_for(lambda: any(p.name.endswith(".tmp") and not p.name.endswith(".f16.tmp") and p.stat().st_size > 0
                               for p in out.iterdir()))
    interrupted(r.interrupt())
    assert list(out.iterdir()) == []


def test_an_interrupt_a_library_swallows_is_raised_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Was: Ctrl-C while safetensors built a tensor became its ValueError ("could not determine the shape of object
    type ..."), and convert ended with `error: ...: cannot read tensor` and exit 1, as if the file were corrupt
    (seen once in CI). A tensor read that swallows an interrupt ends as the interrupt."""
    import contextlib

    import safetensors

    from edge_adapt.convert.checkpoint import Checkpoint
    from edge_adapt import interrupts

    class Swallowing:  # what safetensors does with an interrupt that lands while it builds a tensor
        def get_tensor(self, name: str) -> None:
            try:
                interrupts._raise_interrupt(signal.SIGINT, None)
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: contextlib.nullcontext(Swallowing()))
    file = tmp_path / "model.safetensors"
    ckpt = Checkpoint(tmp_path, {}, {"w": (2,)}, {"w": file})
    with pytest.raises(KeyboardInterrupt):
        ckpt.load("w")
    monkeypatch.setattr(Swallowing, "get_tensor", lambda self, name: (_ for _ in ()).throw(ValueError("corrupt")))
    with pytest.raises(ModelFileError, match="cannot read tensor 'w' \\(ValueError\\)"):  # a real fault stays one
        ckpt.load("w")


@pytest.mark.parametrize("moment", ["imports", "writing"])
def test_import_interrupted_publishes_nothing(moment: str, tmp_path: Path):
    pytest.importorskip("torch")
    r = Run(["import", "-o", str(tmp_path / "hf")])
    if moment == "imports":
        r.wait_for(r.maps("libllama"))
    else:
        r.wait_for(lambda: any(p.name.endswith(".tmp") and (p / "model.safetensors").exists() for p in tmp_path.iterdir()))
    interrupted(r.interrupt())
    assert list(tmp_path.iterdir()) == []


# -- label / eval / train -----------------------------------------------------------------------------------
def _cache_has_a_pool(cache: Path) -> Callable[[], bool]:
    return lambda: cache.is_dir() and any(cache.glob("pool-*.jsonl"))


@pytest.mark.parametrize("moment", ["imports", "sampling"])
def test_label_interrupted_publishes_nothing(moment: str, tmp_path: Path):
    cache = tmp_path / "cache"
    r = Run(["label", "-o", str(tmp_path / "l.jsonl"), "--prompts", "40", "-k", "4", "--max-tokens", "96",
             "--cache", str(cache)])
    if moment == "imports":
        r.wait_for(r.maps("libllama"))
    else:
        r.wait_for(_cache_has_a_pool(cache))
    interrupted(r.interrupt())
    assert not (tmp_path / "l.jsonl").exists()
    no_temp_files(tmp_path)
    # What the cache holds (finished prompts) is kept for the next run; an empty cache folder is not.
    assert not cache.exists() or any(cache.iterdir())


@pytest.mark.parametrize("entry", ["edge-adapt eval", "python -m edge_adapt.eval"])  # the second: without the CLI
@pytest.mark.parametrize("moment", ["imports", "sampling"])
def test_eval_interrupted_publishes_nothing(entry: str, moment: str, tmp_path: Path):
    """One `interrupted` line, exit 130, no traceback, no report; the cache keeps what it holds. (Was, for `python
    -m edge_adapt.eval`: a traceback.)"""
    cache, report = tmp_path / "cache", tmp_path / "report"
    if entry == "edge-adapt eval":
        r = Run(["eval", "--prompts", "40", "-k", "4", "--max-tokens", "64", "--cache", str(cache), "--out",
                 str(report)])
    else:
        r = Run(["n_prompts=40", "k=4", "max_tokens=64", f"cache_dir={cache}", f"out_dir={report}"],
                module="edge_adapt.eval")
    if moment == "imports":
        r.wait_for(r.maps("libllama"))
    else:
        r.wait_for(_cache_has_a_pool(cache))
    interrupted(r.interrupt())
    assert not report.exists()
    no_temp_files(tmp_path)
    assert not cache.exists() or any(cache.iterdir())


def test_eval_interrupted_keeps_a_cache_inside_its_new_report_folder(tmp_path: Path):
    """Was: `--out R --cache R/cache` interrupted removed R, the sampled prompts with it."""
    report = tmp_path / "report"
    cache = report / "cache"
    r = Run(["eval", "--prompts", "40", "-k", "4", "--max-tokens", "64", "--cache", str(cache), "--out", str(report)])
    r.wait_for(_cache_has_a_pool(cache))
    interrupted(r.interrupt())
    assert [p.name for p in report.iterdir()] == ["cache"] and any(cache.glob("pool-*.jsonl"))
    no_temp_files(tmp_path)


def test_tune_policy_interrupted_after_tuning_publishes_no_policy(tmp_path: Path):
    """Was: the policy was published as soon as it was tuned, so a run stopped while it sampled the test split
    left it, and the rerun was refused without --force."""
    policy = tmp_path / "policy.json"
    r = Run(["tune-policy", "-o", str(policy), "--prompts", "10", "-k", "2", "--max-tokens", "8", "--budget", "2",
             "--test-split", "test", "--test-prompts", "40", "--cache", str(tmp_path / "cache")])
    r.wait_for(lambda: any(p.stat().st_size for p in tmp_path.glob(".policy.json.*.tmp")), timeout=300)
    interrupted(r.interrupt(), verbose=True)  # the tuning pool's summary line comes first
    assert not policy.exists()
    no_temp_files(tmp_path)


def _labels(path: Path, pids: list[str]) -> Path:
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.train.labels import FORMAT, VERSION

    i = inspect_gguf(default_model_path())
    head = {"format": FORMAT, "version": VERSION, "model": f"{i.architecture}:{i.n_params}:{i.n_vocab}:{i.file_type}"}
    rows = [{"sample": s, "correct": s == 0, "target": 1.0 - s, "cut": None, "ids": [28, 29, 30]} for s in (0, 1)]
    recs = [{"problem_id": p, "level": 1, "prompt_ids": [1, 2, 3], "rows": rows} for p in pids]
    path.write_text("\n".join(json.dumps(x) for x in [head, *recs]) + "\n")
    return path


@pytest.mark.parametrize("moment", ["imports", "importing the base model", "terminated"])
def test_train_interrupted_leaves_no_output(moment: str, tmp_path: Path):
    pytest.importorskip("peft")
    train, val = _labels(tmp_path / "t.jsonl", ["a", "b"]), _labels(tmp_path / "v.jsonl", ["c", "d"])
    out = tmp_path / "run"
    r = Run(["train", str(train), "--validation", str(val), "-o", str(out), "--epochs", "1"])
    if moment == "imports":
        r.wait_for(r.maps("libllama"))
    else:
        r.wait_for(lambda: out.is_dir() and any(p.name.startswith(".base-hf") for p in out.iterdir()))
    # SIGTERM (a desktop app or a service manager stopping the command) is taken as Ctrl-C is.
    interrupted(r.interrupt(signum=signal.SIGTERM if moment == "terminated" else signal.SIGINT))
    assert not out.exists()
    no_temp_files(tmp_path)


def test_train_force_interrupted_leaves_the_earlier_run_whole(tmp_path: Path):
    """`train --force` into an earlier run's directory, interrupted while training: the earlier run's checkpoint,
    adapter, metrics and plot are all still its own (the checkpoint used to be the new run's, the rest the old)."""
    pytest.importorskip("peft")
    train, val = _labels(tmp_path / "t.jsonl", ["a", "b"]), _labels(tmp_path / "v.jsonl", ["c", "d"])
    out = tmp_path / "run"
    args = ["train", str(train), "--validation", str(val), "-o", str(out), "--epochs", "1", "--threads", "1"]
    done = subprocess.run([sys.executable, "-m", "edge_adapt", *args], capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and "base-hf" not in p.parts}
    assert {Path("adapter.gguf"), Path("metrics.json"), Path("training.png")} <= set(files)
    r = Run([*args, "--force", "--epochs", "4", "--seed", "7"])
    r.wait_for(lambda: (out / ".new" / "checkpoint").is_dir(), timeout=600)  # validated once, now training
    interrupted(r.interrupt(), verbose=True)  # transformers' warnings and the progress lines come first
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and "base-hf" not in p.parts} == files
    assert not (out / ".new").exists()
    no_temp_files(tmp_path)


# -- the entry point's edges -----------------------------------------------------------------------------------
def test_an_interrupt_inside_held_waits_for_the_block_and_stays_pending():
    """train's move of its outputs into place: a Ctrl-C there used to leave a new adapter.gguf beside the earlier
    run's metrics and checkpoint."""
    import signal as sig

    from edge_adapt import interrupts

    before = sig.getsignal(sig.SIGINT), sig.getsignal(sig.SIGTERM)
    interrupts.install()
    try:
        done = []
        with interrupts.held():
            os.kill(os.getpid(), sig.SIGINT)
            time.sleep(0.05)
            done.append("every rename")
        assert done == ["every rename"]
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        sig.signal(sig.SIGINT, before[0])
        sig.signal(sig.SIGTERM, before[1])


def test_ctrl_c_while_the_finished_command_shuts_down_is_no_traceback():
    """Was: Ctrl-C in the second after `wrote ...` printed `Exception ignored in atexit callback` and a traceback."""
    code = ("import atexit, os, signal, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.1)))\n"
            "from edge_adapt.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
