"""`edge-adapt train` under `accelerate launch` with two CPU processes: data-parallel over prompts, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_adapt.engine import Engine
from edge_adapt.train.labels import LabelConfig, label


def _env(tmp_path: Path) -> dict[str, str]:
    """One torch thread per process (two processes on two cores), no GPU, and no accelerate config of the
    user's (accelerate reads its default config file under HF_HOME)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf"),
            "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return proc, time.perf_counter() - t0


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_the_main_one_writes(engine: Engine, tmp_path: Path):
    """4 training prompts, 3 per step: in the first step process 0 scores two prompts (its gradients add up
    locally before the all-reduce) and process 1 one; in the second step process 1 has none and joins the
    all-reduce with zero gradients. Validation is shared and gathered."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from edge_adapt.selfeval import SelfEvaluator

    common = dict(k=4, max_tokens=24, cuts=[8], cache_dir=tmp_path / "cache")
    tr = label(LabelConfig(out=tmp_path / "train.jsonl", split="train", n_prompts=4, **common), engine)
    va = label(LabelConfig(out=tmp_path / "val.jsonl", split="validation", n_prompts=2, **common), engine)
    args = ["train", str(tr), "--validation", str(va), "--epochs", "1", "--prompts-per-step", "3", "--lr", "1e-3",
            "--no-validate-before"]
    env = _env(tmp_path)
    one, t_one = _run([sys.executable, "-m", "edge_adapt", *args, "-o", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "edge_adapt"]
    two, t_two = _run([*launch, *args, "-o", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    (e1,), (e2,) = m1["epochs"], m2["epochs"]
    print(f"1 process: {t_one:.0f} s, train loss {e1['train_loss']:.7f}, val loss {e1['val_loss']:.7f}, AUROC "
          f"{e1['auroc']}, Brier {e1['brier']:.7f}; 2 processes: {t_two:.0f} s, train loss {e2['train_loss']:.7f}, "
          f"val loss {e2['val_loss']:.7f}, AUROC {e2['auroc']}, Brier {e2['brier']:.7f}")

    # Only the main process wrote: the same files as one process's run (nothing twice, no temp files left), one
    # progress line and one closing line in the output of both processes together.
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
    assert not [p for p in (tmp_path / "two").rglob(".*")]
    out = two.stdout + two.stderr
    assert out.count("epoch 1: AUROC") == 1 and out.count("wrote ") == 1, out

    # The same update: each process weighs its rows by the whole step's row count and scales its loss by the
    # process count, DDP averages, so only the order of float sums differs (a process's prompts summed first, then
    # the all-reduce); the thread count does not (one per process in both runs). Measured here: train loss 2e-9
    # apart, validation loss 1e-10, Brier equal; up to 1e-6 on other label sets (and bit for bit when each process
    # holds at most one prompt per step). The bound, 1e-4, leaves room for CPUs that sum in other orders and for
    # Adam, whose first steps move a weight by about lr * sign(gradient), so a gradient near zero can turn float
    # noise into a whole step. It is not looser because the two likely mistakes move the validation loss by more:
    # rows averaged per process instead of per step by 9e-2, the loss not scaled by the process count by 5e-4
    # (Adam is nearly blind to the gradient's scale; clipping and its epsilon are not).
    for key in ("train_loss", "val_loss", "brier"):
        assert e2[key] == pytest.approx(e1[key], abs=1e-4), key
    # AUROC ranks ~10 whole responses by score: it changes only if two of them lie within that noise.
    assert e2["auroc"] == e1["auroc"]

    # The export loads in the runtime and scores as the one-process adapter does (both are f16 files).
    prompt = engine.tokenize(engine.chat_prompt([{"role": "user", "content": "What is 2 + 5?"}]))
    scores = []
    for run in ("one", "two"):
        ev = SelfEvaluator(engine, adapter_path=tmp_path / run / "adapter.gguf")
        assert ev.suffix == m2["suffix_ids"]
        with engine.opened(prompt) as root:
            (p,) = ev.score([root])
        scores.append(p)
    assert 0.0 < scores[1] < 1.0 and scores[1] == pytest.approx(scores[0], abs=1e-3)
