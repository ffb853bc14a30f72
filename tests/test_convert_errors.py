"""Bad input: one-line error, the right exit code, and never a file (or temp file) left behind."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from convert_fixtures import build_lora, gguf_dir, llama_dir, qwen2_dir  # noqa: E402

from edge_adapt.convert import convert_adapter, convert_model, import_adapter, import_gguf  # noqa: E402
from edge_adapt.errors import ModelFileError, UsageError  # noqa: E402

__all__ = ["gguf_dir", "llama_dir", "qwen2_dir"]


def _copy(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in skip])
    return dst


def _only(directory: Path, *names: str) -> None:
    """The output directory holds exactly these entries: no output, no temp file."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


def test_unknown_architecture_rejected(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert_model(src, out / "m.gguf")
    _only(out)


def test_missing_checkpoint_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such directory"):
        convert_model(tmp_path / "nope", tmp_path / "m.gguf")
    _only(tmp_path)


def test_missing_tensor_is_incomplete_checkpoint(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = _copy(llama_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="incomplete checkpoint.*model.layers.1.mlp.down_proj.weight"):
        convert_model(src, out / "m.gguf")
    _only(out)


def test_missing_shard_is_incomplete_checkpoint(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src", skip=("model.safetensors",))
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="incomplete checkpoint, 2 shard"):
        convert_model(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_truncated_weights_rejected(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError):
        convert_model(src, out / "m.gguf")
    _only(out)


def test_missing_tokenizer_rejected(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src", skip=("tokenizer.json",))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="tokenizer missing"):
        convert_model(src, out / "m.gguf")
    _only(out)


def test_unknown_pre_tokenizer_rejected(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src")
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelFileError, match="matches none llama.cpp implements"):
        convert_model(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type_rejected(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown type 'q3_xs'; choose one of f32"):
        convert_model(llama_dir, tmp_path / "m.gguf", type="q3_xs")
    _only(tmp_path)


def test_existing_output_kept_without_force(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        convert_model(llama_dir, out, type="f16")
    assert out.read_bytes() == b"keep me"
    convert_model(llama_dir, out, type="f16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    _only(tmp_path, "m.gguf")


def test_adapter_for_different_base_rejected(llama_dir: Path, qwen2_dir: Path, gguf_dir: Path,
                                             tmp_path: Path) -> None:
    lora = build_lora(llama_dir, tmp_path / "lora")
    qwen_gguf = gguf_dir / "qwen2.e.f16.gguf"
    convert_model(qwen2_dir, qwen_gguf, type="f16", force=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="does not fit .*different base"):
        convert_adapter(lora, qwen_gguf, out / "a.gguf")
    with pytest.raises(ModelFileError, match="does not fit .*different base"):
        convert_model(qwen2_dir, out / "m.gguf", merge_adapter=lora)
    llama_gguf = gguf_dir / "llama.e.f16.gguf"
    convert_model(llama_dir, llama_gguf, type="f16", force=True)
    convert_adapter(lora, llama_gguf, tmp_path / "a.gguf")
    with pytest.raises(ModelFileError, match="is a llama adapter, qwen2.e.f16.gguf a qwen2 model"):
        import_adapter(tmp_path / "a.gguf", qwen_gguf, out / "peft")
    _only(out)


def test_alora_cannot_be_merged(llama_dir: Path, tmp_path: Path) -> None:
    alora = build_lora(llama_dir, tmp_path / "alora", invocation=[3, 5])
    with pytest.raises(UsageError, match="activated LoRA"):
        convert_model(llama_dir, tmp_path / "m.gguf", merge_adapter=alora)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_self_eval_config_rejected(llama_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    for text in ("[1, 2]", '{"nested": {"a": 1}}', '{"mixed": [1, "a"]}', "{not json"):
        cfg.write_text(text)
        with pytest.raises(UsageError):
            convert_model(llama_dir, tmp_path / "m.gguf", self_eval_config=cfg)
    _only(tmp_path, "cfg.json")


def test_permission_denied_is_one_line_error(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o500)
    else:  # root ignores directory modes; make the temp-file creation fail the way the kernel would
        import edge_adapt.fileio as atomic

        def denied(*_a: object, **_k: object) -> tuple[int, str]:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    try:
        with pytest.raises(ModelFileError, match="permission denied"):
            convert_model(llama_dir, out / "m.gguf", type="f16")
    finally:
        out.chmod(0o700)
    _only(out)


def _cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(), as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = "from edge_adapt.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_disk_full_leaves_nothing_behind(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = _cli("convert", str(llama_dir), "-o", str(out / "m.gguf"), "--type", "f32", fsize=1_000_000)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "no space left" in last, r.stderr
    assert "Traceback" not in r.stderr
    _only(out)


def test_cli_errors_are_one_line_with_exit_codes(llama_dir: Path, tmp_path: Path) -> None:
    r = _cli("convert", str(llama_dir), "-o", str(tmp_path / "m.gguf"), "--type", "q9")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: unknown type 'q9'; choose one of f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k")
    r = _cli("convert-adapter", str(tmp_path / "nope"), "--base", str(tmp_path / "b.gguf"), "-o", str(tmp_path / "a.gguf"))
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "\n" not in r.stderr.strip()
    r = _cli("import", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "hf"))
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope.gguf'}: no such file"
    _only(tmp_path)


def test_import_rejects_adapter_and_keeps_existing_dir(llama_dir: Path, gguf_dir: Path, tmp_path: Path) -> None:
    lora = build_lora(llama_dir, tmp_path / "lora")
    base = gguf_dir / "llama.i.f16.gguf"
    convert_model(llama_dir, base, type="f16", force=True)
    convert_adapter(lora, base, tmp_path / "a.gguf")
    with pytest.raises(ModelFileError, match="adapter GGUF"):
        import_gguf(tmp_path / "a.gguf", tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        import_gguf(base, tmp_path / "hf")
    _only(tmp_path, "lora", "a.gguf", "hf")
