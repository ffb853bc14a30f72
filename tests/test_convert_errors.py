"""Bad input: one-line error, the right exit code, and never a file (or temp file) left behind."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import struct
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


def test_self_eval_config_link_loop_is_named_as_one(llama_dir: Path, tmp_path: Path) -> None:
    """A --self-eval-config that is a link loop was "not found"."""
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match="loop.json: cannot read .*symbolic links"):
        convert_model(llama_dir, tmp_path / "m.gguf", self_eval_config=loop)
    with pytest.raises(UsageError, match="gone.json: self-eval config not found"):
        convert_model(llama_dir, tmp_path / "m.gguf", self_eval_config=tmp_path / "gone.json")


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


def _cli(*args: str, fsize: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(), as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = "from edge_adapt.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=cwd)


def test_disk_full_leaves_nothing_behind(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = _cli("convert", str(llama_dir), "-o", str(out / "m.gguf"), "--type", "f32", fsize=1_000_000)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "no space left" in last and "None" not in last, r.stderr
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


def _edit_json(path: Path, change: object) -> None:
    """Rewrite a JSON file through `change(data)`, which edits it in place or returns the new data."""
    data = json.loads(path.read_text())
    new = change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data if new is None else new))


@pytest.mark.parametrize(("setting", "message"), [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling.factor must be a positive number .*got None"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, r"rope_scaling.factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn rope scaling is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                          "original_max_position_embeddings": 64}}, "rope_parameters.high_freq_factor must exceed"),
    ({"sliding_window": 0}, "sliding_window must be a whole number >= 1"),
])
def test_unsupported_llama_settings_refused_by_name(setting: dict, message: str, llama_dir: Path,
                                                    tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src")
    _edit_json(src / "config.json", lambda cfg: cfg.update(setting))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match=f"config.json: {message}"):
        convert_model(src, out / "m.gguf", type="f16")
    _only(out)


def _qwen2_with_its_own_head_dim(qwen2_dir: Path, out: Path) -> Path:
    """The Qwen2 fixture with head_dim x heads (32 x 4) other than hidden_size (96): transformers runs it,
    llama.cpp's qwen2 graph does not."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = _copy(qwen2_dir, out)
    cfg = Qwen2Config.from_pretrained(str(src))
    cfg.hidden_size, cfg.head_dim = 96, 32
    Qwen2ForCausalLM(cfg).save_pretrained(str(src))
    return src


def test_qwen2_settings_llama_cpp_cannot_run_refused(qwen2_dir: Path, tmp_path: Path) -> None:
    """Only the Llama class writes the rope_freqs tensor llama3 scaling needs; llama.cpp's qwen2 graph sizes
    attention by hidden_size, so a head_dim that differs would not load."""
    src = _copy(qwen2_dir, tmp_path / "rope")
    _edit_json(src / "config.json", lambda cfg: cfg.update(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 5e5}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="llama3 rope scaling is not supported for Qwen2ForCausalLM"):
        convert_model(src, out / "m.gguf", type="f16")

    src = _qwen2_with_its_own_head_dim(qwen2_dir, tmp_path / "head_dim")
    with pytest.raises(ModelFileError, match="head_dim 32 x 4 heads differs from hidden_size 96"):
        convert_model(src, out / "m.gguf", type="f16")
    _only(out)


def test_file_llama_cpp_refuses_is_not_published(qwen2_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The closing check loads the file in llama.cpp itself, so a setting the converter fails to refuse by
    name (here the qwen2 head_dim refusal, switched off) still publishes nothing."""
    from edge_adapt.convert.registry import ModelBase, Qwen2Model

    src = _qwen2_with_its_own_head_dim(qwen2_dir, tmp_path / "src")
    monkeypatch.setattr(Qwen2Model, "check_supported", ModelBase.check_supported)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match=f"^{out / 'm.gguf'}: not written, llama.cpp refuses to load"):
        convert_model(src, out / "m.gguf", type="f16")
    _only(out)


def test_nan_weight_error_names_the_output_not_the_temp_file(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = _copy(llama_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError) as info:
        convert_model(src, out / "m.gguf", type="f16")
    assert str(info.value) == f"{out / 'm.gguf'}: not written, tensor 'blk.0.ffn_up.weight' holds NaN or infinite values"
    _only(out)


@pytest.mark.parametrize(("file", "change", "message"), [
    ("tokenizer_config.json", lambda _: [1], r"tokenizer_config.json: not a JSON object"),
    ("tokenizer.json", lambda tj: tj["model"].update(merges=[1, 2]), r"tokenizer.json: model.merges\[0\] is 1"),
    ("tokenizer.json", lambda tj: tj["model"].update(merges=[["a", 2]]), r"model.merges\[0\] is \['a', 2\]"),
    ("tokenizer.json", lambda tj: tj["model"].update(vocab={"a": "x"}), "model.vocab must map each token"),
    ("tokenizer.json", lambda tj: tj.update(added_tokens=[{"id": "x"}]), "added_tokens entry"),
])
def test_malformed_tokenizer_files_named(file: str, change: object, message: str, llama_dir: Path,
                                         tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src")
    _edit_json(src / file, change)
    with pytest.raises(ModelFileError, match=message):
        convert_model(src, tmp_path / "m.gguf", type="f16")
    assert not (tmp_path / "m.gguf").exists()


def test_tokenizer_settings_llama_cpp_cannot_honour_refused(llama_dir: Path, qwen2_dir: Path, tmp_path: Path) -> None:
    """HF strips the whitespace beside an lstrip/rstrip added token and llama.cpp does not; llama.cpp takes whole
    words from the vocabulary (ignore_merges) for llama-bpe only."""
    from edge_adapt.convert.tokenizer import LLAMA3_REGEX, QWEN2_REGEX

    def strip_tool(tj: dict) -> None:
        next(a for a in tj["added_tokens"] if a["content"] == "<tool>")["rstrip"] = True

    src = _copy(llama_dir, tmp_path / "strip")
    _edit_json(src / "tokenizer.json", strip_tool)
    with pytest.raises(ModelFileError, match="added token '<tool>' has rstrip set"):
        convert_model(src, tmp_path / "m.gguf", type="f16")

    src = _copy(llama_dir, tmp_path / "ignore")
    _edit_json(src / "tokenizer.json", lambda tj: tj["model"].update(ignore_merges=True))
    with pytest.raises(ModelFileError, match="model.ignore_merges is True, but llama.cpp always merges with the smollm"):
        convert_model(src, tmp_path / "m.gguf", type="f16")

    src = _copy(qwen2_dir, tmp_path / "llama3")  # the Llama 3 split regex, without ignore_merges
    text = (src / "tokenizer.json").read_text()
    (src / "tokenizer.json").write_text(text.replace(json.dumps(QWEN2_REGEX)[1:-1], json.dumps(LLAMA3_REGEX)[1:-1]))
    with pytest.raises(ModelFileError, match="model.ignore_merges is False, but llama.cpp takes a word .* with the llama-bpe"):
        convert_model(src, tmp_path / "m.gguf", type="f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"r": 0}, "adapter_config.json: r must be a whole number >= 1, got 0"),
    ({"lora_alpha": "8"}, "adapter_config.json: lora_alpha must be a number"),
    ({"alora_invocation_tokens": ["x"]}, r"adapter_config.json: alora_invocation_tokens must be a list of token ids"),
])
def test_malformed_adapter_config_named(change: dict, message: str, llama_dir: Path, tmp_path: Path) -> None:
    lora = build_lora(llama_dir, tmp_path / "lora")
    _edit_json(lora / "adapter_config.json", lambda cfg: cfg.update(change))
    with pytest.raises(ModelFileError, match=message):
        convert_model(llama_dir, tmp_path / "m.gguf", merge_adapter=lora)
    assert not (tmp_path / "m.gguf").exists()


def test_adapter_with_saved_embedding_layer_says_what_to_do(llama_dir: Path, tmp_path: Path) -> None:
    """PEFT's save_embedding_layers stores a full copy of a targeted lm_head as `lm_head.base_layer.weight`."""
    from safetensors.torch import load_file, save_file

    lora = build_lora(llama_dir, tmp_path / "lora")
    state = load_file(str(lora / "adapter_model.safetensors"))
    base = load_file(str(llama_dir / "model.safetensors"))
    state["base_model.model.lm_head.base_layer.weight"] = base["lm_head.weight"]
    save_file(state, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"full copy of lm_head .*save_embedding_layers=False"):
        convert_model(llama_dir, tmp_path / "m.gguf", merge_adapter=lora)
    assert not (tmp_path / "m.gguf").exists()


def test_malformed_inputs_are_one_line_errors_at_the_cli(llama_dir: Path, tmp_path: Path) -> None:
    """What used to escape as `error: unexpected KeyError` (exit 70) is a named one-line error (exit 1)."""
    src = _copy(llama_dir, tmp_path / "src")
    _edit_json(src / "config.json", lambda cfg: cfg.update(rope_scaling={"rope_type": "linear"}))
    r = _cli("convert", str(src), "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == ("error: config.json: rope_scaling.factor must be a positive number for linear rope "
                                "scaling, got None")
    assert not (tmp_path / "m.gguf").exists()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["work", "work/sub"])
@pytest.mark.parametrize("output", ["absolute", "dot"])
def test_import_force_refuses_the_directory_it_runs_in(where: str, output: str, tmp_path: Path) -> None:
    """`import -o "$PWD" --force` (or `-o .`, or a folder above the working directory) would swap the whole
    directory out from under the user: refused before any work, and nothing in it is touched."""
    from hostile_gguf import read_kv, tiny_model

    from edge_adapt.engine.default_model import default_model_path

    tokenizer = {k: v for k, v in read_kv(default_model_path()).items() if k.startswith("tokenizer.")}
    model = tiny_model(tokenizer).write(tmp_path / "m.gguf")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    (work / "sub" / "data.txt").write_text("more")
    cwd = tmp_path / where
    target = str(work) if output == "absolute" else os.path.relpath(work, cwd)
    before = _tree(tmp_path)
    r = _cli("import", str(model), "-o", target, "--force", cwd=cwd)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {target} holds the working directory: the output directory is replaced as "
                                "a whole when it is complete; name a directory below this one")
    assert _tree(tmp_path) == before
    assert (work / "notes.txt").read_text() == "precious"

    code = ("import sys; from edge_adapt.convert import import_adapter; "
            "import_adapter(sys.argv[1], base=sys.argv[1], out=sys.argv[2], force=True)")
    r = subprocess.run([sys.executable, "-c", code, str(model), target], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert r.returncode != 0 and "UsageError" in r.stderr and "holds the working directory" in r.stderr, r.stderr
    assert _tree(tmp_path) == before


def _drop_merges(tj: dict) -> None:
    del tj["model"]["merges"]


@pytest.mark.parametrize(("file", "change", "message"), [
    ("tokenizer.json", _drop_merges, r"tokenizer.json: BPE tokenizer has no merges \(model.merges\); llama.cpp cannot"),
    ("chat_template.jinja", b"{{ messages }}\xff\xfe", r"chat_template.jinja: not valid UTF-8 text"),
    ("tokenizer_config.json", lambda tc: tc.update(chat_template=123),
     r"tokenizer_config.json: chat_template must be a string or a list of named templates"),
    ("config.json", lambda cfg: cfg.update(rms_norm_eps=0), r"config.json: rms_norm_eps is 0.0; expected a small"),
    ("config.json", lambda cfg: cfg.update(rms_norm_eps=-1e-5),
     r"config.json: rms_norm_eps is -1e-05; expected a small positive"),
    ("config.json", lambda cfg: cfg.update(rope_theta=0, rope_parameters={"rope_type": "default", "rope_theta": 0}),
     r"config.json: rope_theta is 0.0; expected a positive number"),
    ("config.json", lambda cfg: cfg.update(rope_theta=-5.0, rope_parameters=None),
     r"config.json: rope_theta is -5.0; expected a positive"),
    ("config.json", lambda cfg: cfg.update(architectures={"a": 1}), r"config.json: architectures must be a list"),
])
def test_bad_checkpoint_files_are_one_named_error(file: str, change: object, message: str, llama_dir: Path,
                                                  tmp_path: Path) -> None:
    """Each used to end in a converter-bug message, `error: unexpected ...` (exit 70), or a silent default."""
    src = _copy(llama_dir, tmp_path / "src")
    if file == "tokenizer_config.json":
        (src / "chat_template.jinja").unlink(missing_ok=True)  # it takes precedence over the config's template
    if isinstance(change, bytes):
        (src / file).write_bytes(change)
    else:
        _edit_json(src / file, change)
    _refused_in_one_line(src, tmp_path / "out", message)


def _refused_in_one_line(src: Path, out: Path, message: str) -> None:
    """Converting `src` is refused with `message`, the CLI says it in one `error:` line, and `out` stays empty."""
    out.mkdir()
    with pytest.raises(ModelFileError, match=message):
        convert_model(src, out / "m.gguf", type="f16")
    _only(out)
    r = _cli("convert", str(src), "-o", str(out / "m.gguf"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    _only(out)


def test_architectures_given_as_one_string_is_read_as_that_name(llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(llama_dir, tmp_path / "src")
    _edit_json(src / "config.json", lambda cfg: cfg.update(architectures="LlamaForCausalLM"))
    assert convert_model(src, tmp_path / "m.gguf", type="f16").architecture == "llama"


def test_gguf_without_bpe_merges_refused_at_info_and_import(llama_dir: Path, gguf_dir: Path, tmp_path: Path) -> None:
    """llama.cpp cannot load a BPE vocabulary without merges: info and import say so instead of passing it on."""
    from hostile_gguf import read_kv

    from edge_adapt.engine.gguf_file import inspect_gguf

    base = gguf_dir / "llama.m.f16.gguf"
    convert_model(llama_dir, base, type="f16", force=True)
    kv = read_kv(base)
    assert "tokenizer.ggml.merges" in kv
    data = base.read_bytes()
    key = b"tokenizer.ggml.merges"
    at = data.index(struct.pack("<Q", len(key)) + key)
    _, raw = kv["tokenizer.ggml.merges"]
    end = at + 8 + len(key) + 4 + len(raw)
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    # Drop the entry and pad where it was, so the tensor data stays aligned: the padding is a harmless string key.
    filler = b"x" * (end - at - 20)
    pad = struct.pack("<Q", len(filler)) + filler + struct.pack("<I", 8) + struct.pack("<Q", 0)
    assert len(pad) == end - at
    bad = tmp_path / "nomerges.gguf"
    bad.write_bytes(data[:16] + struct.pack("<Q", n_kv) + data[24:at] + pad + data[end:])
    with pytest.raises(ModelFileError, match="BPE tokenizer has no merges"):
        inspect_gguf(bad)
    r = _cli("info", str(bad))
    assert r.returncode == 1 and r.stderr == f"error: {bad}: BPE tokenizer has no merges (tokenizer.ggml.merges); " \
        "llama.cpp cannot load it\n"
    r = _cli("import", str(bad), "-o", str(tmp_path / "hf"))
    assert r.returncode == 1 and "BPE tokenizer has no merges" in r.stderr and r.stderr.count("\n") == 1
    _only(tmp_path, "nomerges.gguf")


def test_wrong_kind_of_input_is_named_not_misdescribed(tmp_path: Path) -> None:
    """An adapter GGUF where a model belongs names no --adapter option the command lacks; a GGUF file where a PEFT
    directory belongs is not "no such directory"; a directory where a GGUF belongs says it is one."""
    from edge_adapt.engine.default_model import default_model_path, default_selfeval_adapter

    adapter, model = default_selfeval_adapter(), default_model_path()
    assert adapter is not None
    r = _cli("import", str(adapter), "-o", str(tmp_path / "hf"))
    assert r.returncode == 1 and r.stderr == f"error: {adapter}: this is an adapter GGUF, not a model (an adapter " \
        "is applied on top of its base model)\n"
    r = _cli("convert-adapter", str(tmp_path / "peft"), "--base", str(adapter), "-o", str(tmp_path / "a.gguf"))
    assert r.returncode == 1 and "--adapter" not in r.stderr and "adapter GGUF, not a model" in r.stderr
    r = _cli("convert-adapter", str(adapter), "--base", str(model), "-o", str(tmp_path / "a.gguf"))
    assert r.returncode == 1 and r.stderr == f"error: {adapter}: a GGUF adapter file, not a PEFT adapter directory " \
        "(adapter_config.json, adapter_model.safetensors)\n"
    r = _cli("info", str(tmp_path))
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path}: is a directory; a GGUF file is expected here\n"
    _only(tmp_path)


@pytest.mark.parametrize(("kind", "use"), [
    ("f16", "; use --type bf16 or f32"),
    ("q4_k_m", ", which the f16 file q4_k_m is quantized from cannot hold; use --type q8_0, bf16 or f32"),
])
def test_weight_beyond_f16_range_named_with_the_types_that_hold_it(kind: str, use: str, llama_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A finite 1e5 (bf16 / f32 checkpoints hold such values) is not "NaN or infinite", nor a numpy warning."""
    from safetensors.torch import load_file, save_file

    src = _copy(llama_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight"][3, 5] = -1e5
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    r = _cli("convert", str(src), "-o", str(out / "m.gguf"), "--type", kind)
    assert r.returncode == 1
    assert r.stderr == (f"error: tensor 'blk.0.ffn_down.weight' has values beyond f16's range (|x| up to 1e+05){use}"
                        "\n")
    _only(out)


def _base_gguf(llama_dir: Path, gguf_dir: Path) -> Path:
    base = gguf_dir / "llama.s29.f16.gguf"
    if not base.exists():
        convert_model(llama_dir, base, type="f16")
    return base


def test_import_refuses_an_output_directory_holding_its_input(llama_dir: Path, gguf_dir: Path,
                                                               tmp_path: Path) -> None:
    """`import out/m.gguf -o out --force` swapped the whole folder in and deleted the model it read (and every
    other file there); `import_adapter` with the adapter inside its PEFT output folder did the same."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.gguf"
    shutil.copy(_base_gguf(llama_dir, gguf_dir), model)
    (work / "notes.txt").write_text("precious")
    before = _tree(tmp_path)
    r = _cli("import", str(model), "-o", str(work), "--force")
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"error: {work} holds the input {model}: the output directory is replaced as a whole when "
                        "it is complete, which would delete the input; move it out or name another output directory\n")
    assert _tree(tmp_path) == before

    lora = build_lora(llama_dir, tmp_path / "lora")
    convert_adapter(lora, model, work / "a.gguf")
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match=f"{work} holds the input {work / 'a.gguf'}"):
        import_adapter(work / "a.gguf", model, work, force=True)
    assert _tree(tmp_path) == before


def _edit_lora(lora: Path, change: object) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora / "adapter_model.safetensors"))
    change(state)  # type: ignore[operator]
    save_file(state, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})


_Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_adapter_tensor_rank_must_be_the_configs(llama_dir: Path, gguf_dir: Path, tmp_path: Path) -> None:
    """llama.cpp divides alpha by each tensor's rank: r 8 in the config on rank-4 tensors was written as alpha 16
    and applied at twice PEFT's scale; one pair of another rank (no rank_pattern) passed as well."""
    base = _base_gguf(llama_dir, gguf_dir)
    lora = build_lora(llama_dir, tmp_path / "r8")  # rank 4, alpha 8
    _edit_json(lora / "adapter_config.json", lambda cfg: cfg.update(r=8, lora_alpha=16))
    message = (f"{lora}: model.layers.0.mlp.down_proj.weight has rank 4 (lora_A is 4x512), but "
               "adapter_config.json's r is 8")
    for convert in (lambda: convert_adapter(lora, base, tmp_path / "a.gguf"),
                    lambda: convert_model(llama_dir, tmp_path / "m.gguf", merge_adapter=lora)):
        with pytest.raises(ModelFileError) as info:
            convert()
        assert str(info.value) == message

    mixed = build_lora(llama_dir, tmp_path / "mixed")
    _edit_lora(mixed, lambda st: st.update({f"{_Q}.lora_A.weight": st[f"{_Q}.lora_A.weight"][:2].contiguous(),
                                           f"{_Q}.lora_B.weight": st[f"{_Q}.lora_B.weight"][:, :2].contiguous()}))
    with pytest.raises(ModelFileError, match=r"q_proj.weight has rank 2 \(lora_A is 2x256\), but adapter_config.json's "
                                             "r is 4"):
        convert_adapter(mixed, base, tmp_path / "a.gguf")
    _only(tmp_path, "r8", "mixed")


@pytest.mark.parametrize(("shape", "message"), [
    ((256,), r"lora_A has shape \[256\]; a LoRA half is a 2-D matrix"),
    ((4, 256, 1), r"lora_A has shape \[4, 256, 1\]; a LoRA half is a 2-D matrix"),
])
def test_adapter_tensor_that_is_not_a_matrix_is_named(shape: tuple[int, ...], message: str, llama_dir: Path,
                                                      gguf_dir: Path, tmp_path: Path) -> None:
    """A 1-D lora_A ended in `unexpected IndexError` (exit 70); a 3-D one was blamed on another base model."""
    import torch

    base = _base_gguf(llama_dir, gguf_dir)
    lora = build_lora(llama_dir, tmp_path / "lora")
    _edit_lora(lora, lambda st: st.update({f"{_Q}.lora_A.weight": torch.zeros(shape)}))
    r = _cli("convert-adapter", str(lora), "--base", str(base), "-o", str(tmp_path / "a.gguf"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {lora}: model.layers.0.self_attn.q_proj.weight ")
    assert re.search(message, r.stderr) and "base" not in r.stderr, r.stderr
    _only(tmp_path, "lora")


def test_adapter_on_a_tied_output_head_says_so(qwen2_dir: Path, gguf_dir: Path, tmp_path: Path) -> None:
    """The tied qwen2 base has lm_head (it is the embeddings): "does not have lm_head.weight (different base?)"
    sent the user looking for another model."""
    import torch

    base = gguf_dir / "qwen2.s29.f16.gguf"
    if not base.exists():
        convert_model(qwen2_dir, base, type="f16")
    lora = build_lora(qwen2_dir, tmp_path / "lora")
    head = "base_model.model.lm_head"
    _edit_lora(lora, lambda st: st.update({f"{head}.lora_A.weight": torch.zeros(4, 128),
                                           f"{head}.lora_B.weight": torch.zeros(448, 4)}))
    for convert, what in ((lambda: convert_adapter(lora, base, tmp_path / "a.gguf"), f"base model {base.name}"),
                          (lambda: convert_model(qwen2_dir, tmp_path / "m.gguf", merge_adapter=lora),
                           f"checkpoint {qwen2_dir.name}")):
        with pytest.raises(ModelFileError) as info:
            convert()
        assert str(info.value) == (f"adapter {lora} targets lm_head, which {what} ties to the token embeddings; the "
                                   "converter cannot map a LoRA on a tied output head (train without lm_head in "
                                   "target_modules)")
    _only(tmp_path, "lora")


def test_adapter_beyond_f16_range_is_named_not_a_warning_and_nan(llama_dir: Path, gguf_dir: Path,
                                                                 tmp_path: Path) -> None:
    """convert-adapter --type f16 printed numpy's overflow RuntimeWarning, then blamed NaN or infinite values the
    source does not hold."""
    base = _base_gguf(llama_dir, gguf_dir)
    lora = build_lora(llama_dir, tmp_path / "lora")
    _edit_lora(lora, lambda st: st[f"{_Q}.lora_A.weight"].__setitem__((1, 2), 1e5))
    r = _cli("convert-adapter", str(lora), "--base", str(base), "-o", str(tmp_path / "a.gguf"), "--type", "f16")
    assert r.returncode == 1
    assert r.stderr == ("error: tensor 'blk.0.attn_q.weight.lora_a' has values beyond f16's range (|x| up to 1e+05); "
                        "use --type f32\n")
    assert convert_adapter(lora, base, tmp_path / "a.gguf", type="f32").n_tensors > 0  # f32 holds it
    _only(tmp_path, "lora", "a.gguf")


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _add_token_on(tid_of: str):
    def change(tj: dict) -> None:
        tj["added_tokens"].append({"id": tj["model"]["vocab"][tid_of], "content": "<|new|>", "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return change


def _share_id(tj: dict) -> None:
    vocab = tj["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[second] = vocab[first]


@pytest.mark.parametrize(("file", "change", "message"), [
    ("tokenizer.json", lambda tj: tj.update(normalizer="NFKC"),
     r"tokenizer.json: normalizer must be a JSON object, got \"NFKC\""),
    ("tokenizer.json", lambda tj: tj.update(post_processor="x"),
     r"tokenizer.json: post_processor must be a JSON object, got \"x\""),
    ("tokenizer.json", lambda tj: tj.update(pre_tokenizer=[1]), r"tokenizer.json: pre_tokenizer must be a JSON object"),
    ("tokenizer.json", lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [1]}),
     r"tokenizer.json: pre_tokenizer.pretokenizers\[0\] must be a JSON object, got 1"),
    ("tokenizer.json", lambda tj: tj.update(post_processor={"type": "TemplateProcessing", "single": [1]}),
     r"tokenizer.json: post_processor single must be a list of objects"),
    ("tokenizer.json", _share_id, r"tokenizer.json: model.vocab gives id \d+ to both .* and .*; an id names one token"),
    ("config.json", _deep(100_000), r"config.json: unreadable model config \(JSON nested too deeply\)"),
    ("tokenizer_config.json", _deep(100_000), r"tokenizer_config.json: unreadable tokenizer file \(JSON nested too"),
])
def test_malformed_tokenizer_and_config_are_one_named_error(file: str, change: object, message: str,
                                                           llama_dir: Path, tmp_path: Path) -> None:
    """Each ended in `error: unexpected AttributeError / RecursionError` (exit 70), or, for an id given to two tokens,
    in a GGUF that silently lost one of them."""
    src = _copy(llama_dir, tmp_path / "src")
    if isinstance(change, str):
        (src / file).write_text(change)
    else:
        _edit_json(src / file, change)
    _refused_in_one_line(src, tmp_path / "out", message)


def test_an_added_token_on_a_vocab_entrys_id_is_refused_unless_it_is_that_token(llama_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Was converted silently: the added token took the id, and the normal token vanished from the GGUF."""
    src = _copy(llama_dir, tmp_path / "clash")
    _edit_json(src / "tokenizer.json", _add_token_on("a"))
    with pytest.raises(ModelFileError, match=r"tokenizer.json: added token '<\|new\|>' has id \d+, which is already "
                                             "'a'; an id names one token"):
        convert_model(src, tmp_path / "m.gguf", type="f16")
    assert not (tmp_path / "m.gguf").exists()

    def again(tj: dict) -> None:
        a = dict(tj["added_tokens"][0])
        tj["model"]["vocab"][a["content"]] = a["id"]  # the same token, by the same id, in both lists

    src = _copy(llama_dir, tmp_path / "same")
    _edit_json(src / "tokenizer.json", again)
    assert convert_model(src, tmp_path / "m.gguf", type="f16").n_tensors > 0


@pytest.mark.parametrize(("file", "kind", "message"), [
    ("model.safetensors", "dangling", "a symbolic link to {target}, which does not exist"),
    ("model.safetensors", "fifo", "is a FIFO, not a regular file"),
    ("tokenizer.json", "dangling", "a symbolic link to {target}, which does not exist"),
    ("tokenizer.json", "fifo", "is a FIFO, not a regular file"),
])
def test_checkpoint_file_that_is_not_a_file_says_what_it_is(file: str, kind: str, message: str, llama_dir: Path,
                                                            tmp_path: Path) -> None:
    """Was "no weights" / "tokenizer missing": the user sees the file there and looks for the wrong problem."""
    src = _copy(llama_dir, tmp_path / "src", skip=(file,))
    target = tmp_path / "gone" / file
    if kind == "dangling":
        (src / file).symlink_to(target)
    else:
        os.mkfifo(src / file)
    with pytest.raises(ModelFileError) as info:
        convert_model(src, tmp_path / "m.gguf", type="f16")
    assert str(info.value) == f"{src / file}: " + message.format(target=target) + \
        (" (or loops)" if kind == "dangling" else "")
    assert not (tmp_path / "m.gguf").exists()


def test_adapter_with_lora_alpha_zero_is_refused_not_written_at_full_strength(llama_dir: Path, gguf_dir: Path,
                                                                               tmp_path: Path) -> None:
    """PEFT scales by alpha / r, so lora_alpha 0 changes nothing; written as alpha 0, llama.cpp reads "no alpha" and
    applied the adapter at full strength. A negative alpha has an exact GGUF form (llama.cpp scales by it too)."""
    base = _base_gguf(llama_dir, gguf_dir)
    lora = build_lora(llama_dir, tmp_path / "lora")
    _edit_json(lora / "adapter_config.json", lambda cfg: cfg.update(lora_alpha=0))
    with pytest.raises(ModelFileError) as info:
        convert_adapter(lora, base, tmp_path / "a.gguf")
    assert str(info.value) == (f"{lora / 'adapter_config.json'}: lora_alpha 0 makes the adapter change nothing (PEFT "
                               "scale 0), which a GGUF adapter cannot hold: llama.cpp reads alpha 0 as full strength")
    _only(tmp_path, "lora")
    _edit_json(lora / "adapter_config.json", lambda cfg: cfg.update(lora_alpha=-8))
    assert convert_adapter(lora, base, tmp_path / "a.gguf").alpha == -8


@pytest.mark.parametrize(("config", "message"), [
    ({"format": "bogus"}, "format: Input should be 'chat' or 'raw'"),
    ({"yes": " Yes", "no": " Yes"}, "`yes` and `no` must differ (both are ' Yes')"),
    ({"self_eval.yes": 5}, "yes: Input should be a valid string"),
])
def test_self_eval_config_the_runtime_would_refuse_is_refused_before_writing(config: dict, message: str,
                                                                            llama_dir: Path, gguf_dir: Path,
                                                                            tmp_path: Path) -> None:
    """--self-eval-config was checked for key syntax and value types only: the file was written, and every run
    with it then failed on its edge_adapt.self_eval metadata."""
    base = _base_gguf(llama_dir, gguf_dir)
    lora = build_lora(llama_dir, tmp_path / "lora")
    cfg = tmp_path / "se.json"
    cfg.write_text(json.dumps(config))
    for convert in (lambda: convert_model(llama_dir, tmp_path / "m.gguf", self_eval_config=cfg),
                    lambda: convert_adapter(lora, base, tmp_path / "a.gguf", self_eval_config=cfg)):
        with pytest.raises(UsageError) as info:
            convert()
        assert str(info.value) == f"{cfg}: {message}"
    _only(tmp_path, "lora", "se.json")


def test_alora_whose_self_eval_suffix_lacks_its_invocation_tokens_is_refused(llama_dir: Path, gguf_dir: Path,
                                                                             tmp_path: Path) -> None:
    """convert-adapter wrote an aLoRA whose invocation tokens do not occur in the suffix it is scored with (the
    default question's without --self-eval-config, or the one given), which every scoring command then refused."""
    base = _base_gguf(llama_dir, gguf_dir)
    alora = build_lora(llama_dir, tmp_path / "alora", invocation=[4, 3])  # <|im_end|><|im_start|>
    cfg = tmp_path / "se.json"
    cfg.write_text(json.dumps({"format": "raw", "suffix": "<|im_end|>Restart"}))
    default = "'<|im_end|>\\n<|im_start|>user\\nWould you do better"  # the default question, chat-rendered
    for config, suffix in ((None, default), (cfg, "'<|im_end|>Restart'")):
        with pytest.raises(UsageError) as info:
            convert_adapter(alora, base, tmp_path / "a.gguf", self_eval_config=config)
        assert str(info.value).startswith(f"{tmp_path / 'a.gguf'}: not written, the aLoRA's invocation tokens [4, 3] "
                                          f"do not occur in the self-eval suffix it would be scored with, {suffix}")
        assert str(info.value).endswith("; give --self-eval-config a suffix that contains them")
    _only(tmp_path, "alora", "se.json")
    cfg.write_text(json.dumps({"format": "raw", "suffix": "<|im_end|><|im_start|>Restart"}))
    assert convert_adapter(alora, base, tmp_path / "a.gguf", self_eval_config=cfg).invocation_tokens == [4, 3]


def test_output_naming_an_input_is_refused_even_with_force(llama_dir: Path, gguf_dir: Path, tmp_path: Path) -> None:
    """`convert hf -o hf/model.safetensors --force` replaced the weights it converted, and `convert-adapter --base X
    -o X --force` the base model: --force replaces an earlier output, not an input (also through a link)."""
    src = _copy(llama_dir, tmp_path / "hf")
    base = tmp_path / "base.gguf"
    shutil.copy(_base_gguf(llama_dir, gguf_dir), base)
    (tmp_path / "link.gguf").symlink_to(base)
    lora = build_lora(llama_dir, tmp_path / "lora")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (lambda: convert_model(src, src / "model.safetensors", force=True),
         f"{src / 'model.safetensors'} is a file inside the input {src}"),
        (lambda: convert_adapter(lora, base, base, force=True), f"{base} is the input {base}"),
        (lambda: convert_adapter(lora, tmp_path / "link.gguf", base, force=True),
         f"{base} is the input {tmp_path / 'link.gguf'}"),
    ]
    for convert, message in cases:
        with pytest.raises(UsageError) as info:
            convert()
        assert str(info.value) == f"{message}; name an output the command does not read"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_info_on_a_symbolic_link_loop_says_so(tmp_path: Path) -> None:
    """Was "no such file": Path.exists() is False for a link loop, though the links are there."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    r = _cli("info", str(tmp_path / "loop1"))
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'loop1'}: cannot read (Too many levels of symbolic " \
        "links)\n"
