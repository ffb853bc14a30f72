"""`info` on what the converter writes: models trained for a short context (a converted Mistral writes its
sliding window as the training context) are described without a --ctx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_gguf import U32, read_kv, scalar, tiny_model
from edge_adapt.engine.default_model import default_model_path


def _info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_adapt", "info", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loadable tiny llama that says it was trained for 256 tokens."""
    tokenizer = {k: v for k, v in read_kv(default_model_path()).items() if k.startswith("tokenizer.")}
    g = tiny_model(tokenizer)
    g.kv["llama.context_length"] = scalar(U32, 256)
    return g.write(tmp_path_factory.mktemp("short") / "short.gguf")


def test_info_plans_a_short_trained_context_without_ctx(short_model: Path) -> None:
    r = _info(str(short_model), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["training_context"] == 256 and facts["plan"]["ctx"] == 256
    r = _info(str(short_model))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = _info(str(short_model), "--ctx", "1024")
    assert r.returncode != 0
    assert r.stderr.strip() == "error: --ctx 1024 exceeds the model's training context 256"  # only a --ctx given


def test_chat_and_serve_default_to_a_short_trained_context(short_model: Path) -> None:
    """Was: without --ctx, chat asked for 4096 tokens and serve for 2048, and each refused a model trained for
    fewer as `--ctx 4096 exceeds the model's training context 256`, a flag the user never gave."""
    from serving import running_server

    chat = subprocess.run([sys.executable, "-m", "edge_adapt", "chat", str(short_model), "--threads", "1",
                           "--device", "cpu", "--max-tokens", "2"], input="hi\n", capture_output=True, text=True,
                          timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "(256 tokens of context)" in chat.stdout.splitlines()[0]
    with running_server(str(short_model)) as server:
        r = server.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 300})
        assert r.status_code == 400 and "the context of 256 per sequence" in r.json()["error"]["message"], r.text
