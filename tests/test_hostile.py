"""Hostile input, one case at a time: crafted GGUFs, FIFOs and devices where files belong, crafted chat
snapshots and label files, checkpoints whose shapes lie. Each must end with one `error:` line, a non-zero
exit, no traceback, no crash inside llama.cpp, and nothing left behind. Every input is built in the test.

Most cases run the real command line in this process (`edge_adapt.cli.main`): the files are refused before
llama.cpp sees them. The cases that would reach llama.cpp on a build without these checks (and abort the
process there), FIFOs (which would hang) and chat sessions run as subprocesses with a timeout.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hostile_gguf import (
    ARR, F32, GGML_F16, GGML_F32, GGML_Q8_0, GGUF, I32, STR, U32, U64, Tensor, array, read_kv, scalar, string,
    strings, tiny_model,
)
from edge_adapt.engine.default_model import default_model_path

try:
    from convert_fixtures import llama_dir  # noqa: F401 (a fixture)
except ImportError:  # pragma: no cover
    pass

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


# -- running the command line -------------------------------------------------------------------------------
def cli(*args: str, stdin: bytes | None = None, timeout: float = 120, cwd: Path | None = None) -> tuple[int, str, str]:
    """The command as a user runs it, in its own process; a hang fails the test instead of the suite."""
    try:
        p = subprocess.run([sys.executable, "-m", "edge_adapt", *args], input=stdin, capture_output=True,
                           timeout=timeout, env=ENV, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"edge-adapt {' '.join(args)} hung for {timeout} s")
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def inproc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same command line in this process (`cli.main` as the console script calls it)."""
    from edge_adapt import cli as cli_module

    argv = sys.argv
    sys.argv = ["edge-adapt", *args]
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(result: tuple[int, str, str], fragment: str = "", *, code: int | None = None) -> str:
    rc, _, err = result
    assert rc != 0, f"exit 0 for bad input; stderr: {err!r}"
    assert rc not in (-6, -11, 134, 139), f"crashed (rc {rc}): {err[-2000:]}"
    if code is not None:
        assert rc == code, (rc, err)
    assert "Traceback" not in err and "GGML_ASSERT" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "unexpected" not in lines[0], lines[0]
    assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def nothing_left(directory: Path, *expected: str) -> None:
    """`directory` holds exactly `expected`: no output, no temp file, no empty folder."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)


# -- GGUF: what llama.cpp asserts on, and what it would load and then misbehave with --------------------------
@pytest.fixture(scope="module")
def tokenizer() -> dict[str, tuple[int, bytes]]:
    return {k: v for k, v in read_kv(default_model_path()).items() if k.startswith("tokenizer.")}


def _set(key: str, value: tuple[int, bytes]) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        g.kv[key] = value
    return edit


def _drop(key: str) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        del g.kv[key]
    return edit


def _token(index: int, text: bytes) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        toks = strings(g.kv["tokenizer.ggml.tokens"][1])
        toks[index] = text
        g.kv["tokenizer.ggml.tokens"] = array(STR, toks)
    return edit


def _short(key: str, etype: int) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        raw = g.kv[key][1]
        n = struct.unpack_from("<IQ", raw, 0)[1]
        size = struct.calcsize({I32: "<i", F32: "<f"}[etype])
        g.kv[key] = (ARR, struct.pack("<IQ", etype, n - 1) + raw[12 : 12 + (n - 1) * size])
    return edit


def _lying_array(key: str, etype: int, declared: int) -> Callable[[GGUF], None]:
    return _set(key, array(etype, [0] * 4 if etype != STR else ["a"] * 4, declared=declared))


def _tensor_values(name: str, value: float, dtype: str = "<f4") -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        t = g.tensor(name)
        arr = np.frombuffer(t.data, dtype=dtype).copy()
        arr[len(arr) // 2] = value
        t.data = arr.tobytes()
    return edit


def _q8_embedding_with_nan(g: GGUF) -> None:
    import gguf

    t = g.tensor("token_embd.weight")
    data = np.frombuffer(t.data, "<f2").astype(np.float32).reshape(-1, t.shape[0])
    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    q = q.reshape(-1, 34).copy()
    q[5, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    t.type, t.data = GGML_Q8_0, q.tobytes()


def _tensor_shape(name: str, shape: tuple[int, ...]) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        t = g.tensor(name)
        t.shape = shape
        t.data = t.data[: math.prod(shape) * (2 if t.type == GGML_F16 else 4)].ljust(math.prod(shape) * 4, b"\0")
    return edit


def _remove_tensor(name: str) -> Callable[[GGUF], None]:
    def edit(g: GGUF) -> None:
        g.tensors = [t for t in g.tensors if t.name != name]
    return edit


def _duplicate_tensor(g: GGUF) -> None:
    g.tensors.append(Tensor("blk.0.attn_norm.weight", (32,), GGML_F32, np.ones(32, "<f4").tobytes()))


def _extra_layer_tensor(g: GGUF) -> None:
    g.tensors.append(Tensor("blk.7.attn_norm.weight", (32,), GGML_F32, np.ones(32, "<f4").tobytes()))


def _overflowing_shape(g: GGUF) -> None:
    g.tensors.append(Tensor("blk.0.extra.weight", (1 << 32, 1 << 32), GGML_F32, b""))


def _zero_dim(g: GGUF) -> None:
    g.tensors.append(Tensor("blk.0.extra.weight", (32, 0), GGML_F32, b""))


def _row_not_whole_blocks(g: GGUF) -> None:
    g.tensors.append(Tensor("blk.0.extra.weight", (33, 2), GGML_Q8_0, b"\0" * 68))


def _arr_u32(values: list[int]) -> tuple[int, bytes]:
    return array(U32, values)


def _as_qwen2(*edits: Callable[[GGUF], None]) -> Callable[[GGUF], None]:
    """The tiny llama relabelled as qwen2 (its keys renamed), then `edits` (which name qwen2's keys)."""
    def edit(g: GGUF) -> None:
        g.kv = {("qwen2." + k.removeprefix("llama.") if k.startswith("llama.") else k): v for k, v in g.kv.items()}
        g.kv["general.architecture"] = string("qwen2")
        for e in edits:
            e(g)
    return edit


GGUF_CASES: dict[str, tuple[Callable[[GGUF], None], str]] = {
    # layer count and per-layer arrays (GGML_ASSERT n_layer_all in 1..LLAMA_MAX_LAYERS)
    "block_count_1000": (_set("llama.block_count", scalar(U32, 1000)), "block_count is 1000"),
    "block_count_0": (_set("llama.block_count", scalar(U32, 0)), "block_count is 0"),
    "block_count_513": (_set("llama.block_count", scalar(U32, 513)), "block_count is 513"),
    "block_count_string": (_set("llama.block_count", string("2")), "block_count is '2'"),
    "block_count_float": (_set("llama.block_count", scalar(F32, 2.0)), "block_count"),
    "block_count_more_than_present": (_set("llama.block_count", scalar(U32, 3)), "declares 3 layers"),
    "block_count_fewer_than_present": (_set("llama.block_count", scalar(U32, 1)), "outside the 1 declared layers"),
    "tensor_of_layer_7": (_extra_layer_tensor, "outside the 2 declared layers"),
    "head_count_0": (_set("llama.attention.head_count", scalar(U32, 0)), "head_count"),
    "head_count_missing": (_drop("llama.attention.head_count"), "head_count"),
    "head_count_kv_not_divisor": (_set("llama.attention.head_count_kv", scalar(U32, 3)), "not a multiple"),
    "head_count_kv_0": (_set("llama.attention.head_count_kv", scalar(U32, 0)), "head_count_kv"),
    "head_count_array_too_long": (_set("llama.attention.head_count", _arr_u32([4] * 1000)), "1000 entries for 2"),
    "head_count_array_too_short": (_set("llama.attention.head_count", _arr_u32([4])), "1 entries for 2"),
    "head_count_array_zero": (_set("llama.attention.head_count", _arr_u32([4, 0])), "head_count"),
    "head_count_kv_array_1000": (_set("llama.attention.head_count_kv", _arr_u32([2] * 1000)), "1000 entries"),
    "feed_forward_0": (_set("llama.feed_forward_length", scalar(U32, 0)), "feed_forward_length"),
    "feed_forward_array_short": (_set("llama.feed_forward_length", _arr_u32([64])), "feed_forward_length"),
    "embedding_0": (_set("llama.embedding_length", scalar(U32, 0)), "embedding_length"),
    "embedding_2_31": (_set("llama.embedding_length", scalar(U32, 1 << 31)), "embedding_length"),
    "embedding_not_multiple_of_heads": (_set("llama.embedding_length", scalar(U32, 30)), "not a multiple of 4 heads"),
    "embedding_disagrees_with_tensors": (_set("llama.embedding_length", scalar(U32, 64)), "metadata implies"),
    "key_length_0": (_set("llama.attention.key_length", scalar(U32, 0)), "key_length"),
    # finite positive norms, epsilons and rope parameters (GGML_ASSERT eps >= 0)
    "rms_eps_nan": (_set("llama.attention.layer_norm_rms_epsilon", scalar(F32, float("nan"))), "not a finite"),
    "rms_eps_inf": (_set("llama.attention.layer_norm_rms_epsilon", scalar(F32, float("inf"))), "not a finite"),
    "rms_eps_negative": (_set("llama.attention.layer_norm_rms_epsilon", scalar(F32, -1e-5)), "small positive"),
    "rms_eps_zero": (_set("llama.attention.layer_norm_rms_epsilon", scalar(F32, 0.0)), "small positive"),
    "rms_eps_huge": (_set("llama.attention.layer_norm_rms_epsilon", scalar(F32, 1e9)), "small positive"),
    "rms_eps_string": (_set("llama.attention.layer_norm_rms_epsilon", string("1e-5")), "small positive"),
    "norm_eps_nan": (_set("llama.attention.layer_norm_epsilon", scalar(F32, float("nan"))), "not a finite"),
    "rope_base_nan": (_set("llama.rope.freq_base", scalar(F32, float("nan"))), "not a finite"),
    "rope_base_zero": (_set("llama.rope.freq_base", scalar(F32, 0.0)), "positive number"),
    "rope_base_negative": (_set("llama.rope.freq_base", scalar(F32, -10000.0)), "positive number"),
    "rope_scale_inf": (_set("llama.rope.scaling.factor", scalar(F32, float("-inf"))), "not a finite"),
    "rope_scale_zero": (_set("llama.rope.scaling.factor", scalar(F32, 0.0)), "positive number"),
    "rope_dims_0": (_set("llama.rope.dimension_count", scalar(U32, 0)), "dimension_count"),
    "rope_dims_odd": (_set("llama.rope.dimension_count", scalar(U32, 7)), "dimension_count"),
    "rope_dims_wider_than_head": (_set("llama.rope.dimension_count", scalar(U32, 1000)), "dimension_count"),
    # llama / qwen2 rotate the whole head (qwen2: GGML_ASSERT(n_embd_head == n_rot) when the graph is built)
    "rope_dims_half_head": (_set("llama.rope.dimension_count", scalar(U32, 4)), "rotates the whole head"),
    "qwen2_rope_dims_half_head": (_as_qwen2(_set("qwen2.rope.dimension_count", scalar(U32, 4))),
                                  "qwen2.rope.dimension_count is 4 for heads of 8; llama.cpp's qwen2 graph rotates"),
    # expert counts (GGML_ASSERT n_expert_used_max > 0 / <= n_expert)
    "qwen2_experts_on_dense_model": (_as_qwen2(_set("qwen2.expert_count", scalar(U32, 4))),
                                     "expert_used_count is missing or 0"),
    "experts_used_without_experts": (_set("llama.expert_used_count", scalar(U32, 2)), "declares no experts"),
    "experts_used_more_than_experts": (lambda g: (_set("llama.expert_count", scalar(U32, 2))(g),
                                                  _set("llama.expert_used_count", scalar(U32, 4))(g)),
                                       "more than the 2 experts"),
    "experts_too_many": (lambda g: (_set("llama.expert_count", scalar(U32, 100_000))(g),
                                    _set("llama.expert_used_count", scalar(U32, 2))(g)), "at most 512 experts"),
    # context length
    "context_length_0": (_set("llama.context_length", scalar(U32, 0)), "context_length is 0"),
    "context_length_2_32": (_set("llama.context_length", scalar(U64, 1 << 32)), "context_length"),
    # vocabulary: unique strings (GGML_ASSERT id_to_token.size() == token_to_id.size()), ids inside it
    "vocab_duplicate_endoftext": (_token(49151, b"<|endoftext|>"), "more than once"),
    "vocab_duplicate_word": (_token(1000, b"hello"), ""),
    "vocab_duplicate_empty": (lambda g: (_token(5000, b"")(g), _token(6000, b"")(g)), "more than once"),
    "vocab_empty": (_set("tokenizer.ggml.tokens", array(STR, [])), "no vocabulary"),
    "vocab_missing": (_drop("tokenizer.ggml.tokens"), "no vocabulary"),
    "vocab_not_strings": (_set("tokenizer.ggml.tokens", _arr_u32([1, 2, 3])), "no vocabulary"),
    "vocab_declared_2_31": (_lying_array("tokenizer.ggml.tokens", STR, 1 << 31), "truncated GGUF"),
    "vocab_size_2_31": (_set("llama.vocab_size", scalar(U32, 1 << 31)), "vocab_size"),
    "vocab_size_small": (_set("llama.vocab_size", scalar(U32, 100)), "vocab_size"),
    "token_type_2_40": (_lying_array("tokenizer.ggml.token_type", I32, 1 << 40), "truncated GGUF"),
    "token_type_short": (_short("tokenizer.ggml.token_type", I32), "token_type"),
    "merges_2_40": (_lying_array("tokenizer.ggml.merges", STR, 1 << 40), "truncated GGUF"),
    "scores_short": (_set("tokenizer.ggml.scores", array(F32, [0.0] * 10)), "scores"),
    "bos_out_of_vocab": (_set("tokenizer.ggml.bos_token_id", scalar(U32, 49152)), "bos_token_id"),
    "eos_out_of_vocab": (_set("tokenizer.ggml.eos_token_id", scalar(U32, 1 << 31)), "eos_token_id"),
    "eos_negative": (_set("tokenizer.ggml.eos_token_id", scalar(I32, -5)), "eos_token_id"),
    "padding_out_of_vocab": (_set("tokenizer.ggml.padding_token_id", scalar(U32, 10**6)), "padding_token_id"),
    "unknown_out_of_vocab": (_set("tokenizer.ggml.unknown_token_id", scalar(U32, 49200)), "unknown_token_id"),
    "eot_out_of_vocab": (_set("tokenizer.ggml.eot_token_id", scalar(U32, 50000)), "eot_token_id"),
    "bos_is_string": (_set("tokenizer.ggml.bos_token_id", string("1")), "bos_token_id"),
    # tensors: NaN / Inf data, shapes, table
    "nan_in_norm": (_tensor_values("blk.1.attn_norm.weight", float("nan")), "NaN or infinite"),
    "inf_in_output_norm": (_tensor_values("output_norm.weight", float("inf")), "NaN or infinite"),
    "nan_in_ffn": (_tensor_values("blk.0.ffn_down.weight", float("nan")), "NaN or infinite"),
    "inf_in_f16_embedding": (_tensor_values("token_embd.weight", float("inf"), "<f2"), "NaN or infinite"),
    "nan_in_q8_0_scale": (_q8_embedding_with_nan, "NaN or infinite"),
    "attn_q_wrong_shape": (_tensor_shape("blk.0.attn_q.weight", (32, 16)), "attn_q.weight"),
    "attn_k_wrong_shape": (_tensor_shape("blk.1.attn_k.weight", (32, 8)), "attn_k.weight"),
    "embedding_wrong_vocab": (_tensor_shape("token_embd.weight", (32, 1000)), "token_embd.weight"),
    "norm_wrong_width": (_tensor_shape("blk.0.attn_norm.weight", (16,)), "attn_norm.weight"),
    "no_token_embedding": (_remove_tensor("token_embd.weight"), "token_embd"),
    "duplicate_tensor_name": (_duplicate_tensor, "appears twice"),
    "tensor_shape_overflow": (_overflowing_shape, ""),
    "tensor_zero_dim": (_zero_dim, "shape"),
    "tensor_row_not_whole_blocks": (_row_not_whole_blocks, "shape"),
    "tensor_count_lie": (lambda g: setattr(g, "n_tensors", 10**7), "implausible counts"),
    # one entry of the table left unread: the data was read from the wrong place (and "held NaN" in a real model)
    "tensor_count_one_short": (lambda g: setattr(g, "n_tensors", len(g.tensors) - 1),
                               "tensors its header counts: is that count wrong?"),
    "no_architecture": (_drop("general.architecture"), "no general.architecture"),
    "encoder_architecture": (_set("general.architecture", string("bert")), "unsupported architecture"),
    "unknown_architecture": (_set("general.architecture", string("llama9")), "unsupported architecture"),
}


@pytest.fixture(scope="module")
def tiny(tokenizer: dict[str, tuple[int, bytes]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(dict(tokenizer)).write(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _hostile(tokenizer: dict[str, tuple[int, bytes]], case: str, path: Path) -> Path:
    g = tiny_model(dict(tokenizer))
    GGUF_CASES[case][0](g)
    return g.write(path)


def test_the_untouched_tiny_model_loads_and_runs(tiny: Path):
    """The base every GGUF case corrupts is a good file: refusals come from the one change each makes."""
    rc, out, err = cli("run", "hi", "--model", str(tiny), "--max-tokens", "3", "--temp", "0")
    assert rc == 0, err
    assert "error" not in err


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_crafted_gguf_is_refused_with_one_line(case: str, tokenizer, tmp_path: Path, capsys):
    path = _hostile(tokenizer, case, tmp_path / "m.gguf")
    one_error(inproc(capsys, "info", str(path)), GGUF_CASES[case][1], code=1)


# The ones that reached llama.cpp (abort, out-of-range reads, a silent empty reply) go through `run` and `chat`,
# each in its own process: without the check the process dies with SIGABRT.
LOADED = ["block_count_1000", "vocab_duplicate_endoftext", "rms_eps_nan", "bos_out_of_vocab", "eos_out_of_vocab",
          "context_length_0", "vocab_size_2_31", "nan_in_norm", "head_count_kv_not_divisor", "token_type_short",
          "attn_q_wrong_shape", "qwen2_rope_dims_half_head", "qwen2_experts_on_dense_model",
          "experts_used_without_experts"]


@pytest.mark.parametrize("case", LOADED)
def test_crafted_gguf_never_reaches_llama_cpp(case: str, tokenizer, tmp_path: Path):
    path = _hostile(tokenizer, case, tmp_path / "m.gguf")
    one_error(cli("run", "What is 2 + 2?", "--model", str(path), "--max-tokens", "4", timeout=60), code=1)


def test_duplicate_vocabulary_in_chat(tokenizer, tmp_path: Path):
    path = _hostile(tokenizer, "vocab_duplicate_endoftext", tmp_path / "m.gguf")
    one_error(cli("chat", str(path), stdin=b"hi\n/exit\n", timeout=60), "more than once", code=1)


def test_huge_declared_array_is_refused_at_once(tokenizer, tmp_path: Path):
    import time

    g = tiny_model(dict(tokenizer))
    GGUF_CASES["token_type_2_40"][0](g)
    # 40 MB behind the lying array: a reader that walks item by item takes seconds to find the end.
    g.tensors.append(Tensor("blk.0.pad.weight", (10_000_000,), GGML_F32, bytes(40_000_000)))
    path = g.write(tmp_path / "m.gguf")
    t0 = time.perf_counter()
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.errors import ModelFileError

    with pytest.raises(ModelFileError, match="truncated"):
        inspect_gguf(path)
    assert time.perf_counter() - t0 < 1.5


def test_import_of_more_layers_than_present_writes_nothing(tokenizer, tmp_path: Path, capsys):
    pytest.importorskip("torch")
    path = _hostile(tokenizer, "block_count_more_than_present", tmp_path / "m.gguf")
    one_error(inproc(capsys, "import", str(path), "-o", str(tmp_path / "hf")), "declares 3 layers")
    nothing_left(tmp_path, "m.gguf")


def test_strategy_run_on_a_hostile_model(tokenizer, tmp_path: Path):
    path = _hostile(tokenizer, "vocab_duplicate_endoftext", tmp_path / "m.gguf")
    one_error(cli("run", "hi", "--model", str(path), "--strategy", "best-of-n", "--budget", "2", timeout=60))
    nothing_left(tmp_path, "m.gguf")


# -- files that are not regular files: FIFOs hang a reader, devices never end ---------------------------------
def _fifo(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    return p


FIFO_CASES: dict[str, Callable[[Path], list[str]]] = {
    "run_config": lambda f: ["run", "hi", "--config", str(f)],
    "run_policy_auto": lambda f: ["run", "hi", "--strategy", "auto", "--policy", str(f)],
    "run_model": lambda f: ["run", "hi", "--model", str(f)],
    "run_adapter": lambda f: ["run", "hi", "--strategy", "best-of-n", "--budget", "2", "--adapter", str(f)],
    "info_model": lambda f: ["info", str(f)],
    "chat_config": lambda f: ["chat", "--config", str(f)],
    "train_labels": lambda f: ["train", str(f), "--validation", str(f), "-o", str(f.parent / "out")],
    "convert_self_eval_config": lambda f: ["convert", str(f.parent / "hf"), "-o", str(f.parent / "m.gguf"),
                                           "--self-eval-config", str(f)],
    "import_model": lambda f: ["import", str(f), "-o", str(f.parent / "hf")],
    "convert_adapter_base": lambda f: ["convert-adapter", str(f.parent / "peft"), "--base", str(f),
                                       "-o", str(f.parent / "a.gguf")],
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_fifo_is_refused_not_read(case: str, tmp_path: Path):
    fifo = _fifo(tmp_path, "input.json" if "config" in case or "policy" in case else "input")
    one_error(cli(*FIFO_CASES[case](fifo), timeout=60))
    nothing_left(tmp_path, fifo.name)


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/null", "directory", "sparse_1g", "fifo_symlink"])
def test_config_that_is_not_a_small_regular_file(source: str, tmp_path: Path):
    if source == "directory":
        path = tmp_path / "cfg.toml"
        path.mkdir()
    elif source == "sparse_1g":
        path = tmp_path / "cfg.toml"
        with open(path, "wb") as fh:
            fh.truncate(1 << 30)
    elif source == "fifo_symlink":
        path = tmp_path / "cfg.toml"
        path.symlink_to(_fifo(tmp_path, "pipe"))
    else:
        path = Path(source)
        if not path.exists():
            pytest.skip(f"{source} is not on this system")
    one_error(cli("run", "hi", "--config", str(path), timeout=60))  # its own process: reading /dev/zero never ends


# -- chat snapshots: a bad /load is refused and leaves the chat exactly as it was ------------------------------
def _snapshot_bytes(meta: object, logits: bytes, state: bytes, *, version: int = 2, raw_meta: bytes | None = None,
                    crc_of: bytes | None = None) -> bytes:
    """A snapshot file; from version 2 on with the CRC-32 of `crc_of` (by default: of the file's own bytes)."""
    blob = raw_meta if raw_meta is not None else json.dumps(meta).encode()
    data = struct.pack("<8sIQQQ", b"EDGESNAP", version, len(blob), len(logits), len(state)) + blob + logits + state
    return data + struct.pack("<I", zlib.crc32(crc_of or data)) if version >= 2 else data


@pytest.fixture()
def chat(engine):
    from edge_adapt.engine import GREEDY
    from edge_adapt.session import ChatSession

    s = ChatSession(engine, params=GREEDY, max_tokens=6)
    for ev in s.send("Say hi."):
        pass
    yield s
    s.close()


def _good_snapshot(chat, path: Path) -> tuple[dict, bytes, bytes]:
    chat.save(path)
    data = path.read_bytes()
    _, _, n_json, n_logits, n_state = struct.unpack_from("<8sIQQQ", data)
    at = struct.calcsize("<8sIQQQ")
    meta = json.loads(data[at : at + n_json])
    logits = data[at + n_json : at + n_json + n_logits]
    state = data[at + n_json + n_logits : at + n_json + n_logits + n_state]
    assert data == _snapshot_bytes(meta, logits, state)  # the format these tests craft is the one chat.save writes
    return meta, logits, state


def _m(fn: Callable[[dict], object]) -> Callable[[dict, bytes, bytes], bytes]:
    def build(meta: dict, logits: bytes, state: bytes) -> bytes:
        meta = json.loads(json.dumps(meta))
        out = fn(meta)
        return _snapshot_bytes(meta if out is None else out, logits, state)
    return build


def _pop(key: str) -> Callable[[dict], None]:
    return lambda m: m.pop(key) and None


def _extra(key: str, value: object) -> Callable[[dict], None]:
    return lambda m: m["extra"].__setitem__(key, value)


SNAPSHOT_CASES: dict[str, Callable[[dict, bytes, bytes], bytes]] = {
    "meta_is_a_list": _m(lambda m: [m]),
    "meta_is_a_string": _m(lambda m: "snapshot"),
    "no_tokens_key": _m(_pop("tokens")),
    "no_model_key": _m(_pop("model")),
    "no_n_past": _m(_pop("n_past")),
    "extra_is_a_list": _m(lambda m: m.__setitem__("extra", [1, 2])),
    "turn_is_a_string": _m(_extra("turn", "x")),
    "turn_negative": _m(_extra("turn", -3)),
    "messages_are_ints": _m(_extra("messages", [1, 2])),
    "messages_missing": _m(lambda m: m["extra"].pop("messages") and None),
    "message_without_content": _m(_extra("messages", [{"role": "user"}])),
    "message_with_unknown_role": _m(_extra("messages", [{"role": "wizard", "content": "hi"}])),
    "message_content_not_text": _m(_extra("messages", [{"role": "user", "content": ["hi"]}])),
    "text_is_a_number": _m(_extra("text", 5)),
    "token_id_beyond_vocab": _m(lambda m: m["tokens"].__setitem__(-1, 49152)),
    "token_id_huge": _m(lambda m: m["tokens"].__setitem__(0, 2**40)),
    "token_id_negative": _m(lambda m: m["tokens"].__setitem__(0, -1)),
    "token_id_float": _m(lambda m: m["tokens"].__setitem__(0, 1.5)),
    "tokens_not_a_list": _m(lambda m: m.__setitem__("tokens", "1 2 3")),
    "n_past_disagrees": _m(lambda m: m.__setitem__("n_past", m["n_past"] + 1)),
    "more_tokens_than_the_context": _m(lambda m: (m.__setitem__("tokens", [1] * 5000), m.__setitem__("n_past", 5000))),
    "other_model": _m(lambda m: m.__setitem__("model", "llama:1:2:F16")),
    "odd_logits_bytes": lambda meta, logits, state: _snapshot_bytes(meta, logits[:-1], state),
    "logits_wrong_width": lambda meta, logits, state: _snapshot_bytes(meta, logits[:-8], state),
    "logits_nan": lambda meta, logits, state: _snapshot_bytes(meta, np.full(len(logits) // 4, np.nan, "<f4").tobytes(), state),
    "state_empty": lambda meta, logits, state: _snapshot_bytes(meta, logits, b""),
    "state_of_fewer_tokens": _m(lambda m: (m["tokens"].extend([1, 1]), m.__setitem__("n_past", m["n_past"] + 2))),
    "meta_not_json": lambda meta, logits, state: _snapshot_bytes(None, logits, state, raw_meta=b"{not json"),
    "meta_not_utf8": lambda meta, logits, state: _snapshot_bytes(None, logits, state, raw_meta=b'{"a": "\xff"}'),
    "version_3": lambda meta, logits, state: _snapshot_bytes(meta, logits, state, version=3),
    "one_state_byte_flipped": lambda meta, logits, state: _snapshot_bytes(
        meta, logits, state[:-9] + bytes([state[-9] ^ 1]) + state[-8:], crc_of=_snapshot_bytes(meta, logits, state)[:-4]),
    "checksum_missing": lambda meta, logits, state: _snapshot_bytes(meta, logits, state)[:-4],
    "wrong_magic": lambda meta, logits, state: b"NOTSNAPS" + _snapshot_bytes(meta, logits, state)[8:],
    "header_sizes_lie": lambda meta, logits, state: _snapshot_bytes(meta, logits, state)[:-10],
    "empty_file": lambda meta, logits, state: b"",
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_bad_snapshot_leaves_the_chat_as_it_was(case: str, chat, engine, tmp_path: Path):
    from edge_adapt.errors import EdgeAdaptError

    meta, logits, state = _good_snapshot(chat, tmp_path / "good.snap")
    bad = tmp_path / "bad.snap"
    bad.write_bytes(SNAPSHOT_CASES[case](meta, logits, state))
    before = (list(chat.messages), chat._turn, chat._text, list(chat.seq.tokens), engine.ctx.state_seq_get(chat.seq.id))
    with pytest.raises(EdgeAdaptError):
        chat.load(bad)
    after = (list(chat.messages), chat._turn, chat._text, list(chat.seq.tokens), engine.ctx.state_seq_get(chat.seq.id))
    assert after == before
    # ... and the conversation goes on from where it was.
    reply = [ev for ev in chat.send("And again?")]
    assert reply and len(chat.messages) == len(before[0]) + 2


@pytest.mark.parametrize("state", ["garbage", "cut_short"])
def test_a_state_llama_cpp_refuses_is_decoded_again_from_the_snapshots_tokens(state: str, chat, engine, tmp_path: Path):
    """As a snapshot from an engine of another `parallel` is (its KV layout differs): the tokens are the truth."""
    from edge_adapt.engine import Finished

    meta, logits, good = _good_snapshot(chat, tmp_path / "good.snap")
    expected = [ev.text for ev in chat.send("And again?") if isinstance(ev, Finished)]
    bad = bytes(range(256)) * (len(good) // 256 + 1) if state == "garbage" else good[: len(good) // 2]
    (tmp_path / "bad.snap").write_bytes(_snapshot_bytes(meta, logits, bad))
    before = engine.decoded_tokens
    chat.load(tmp_path / "bad.snap")
    assert engine.decoded_tokens - before == meta["n_past"]
    assert [ev.text for ev in chat.send("And again?") if isinstance(ev, Finished)] == expected


def test_a_snapshot_of_format_version_1_without_a_checksum_still_loads(chat, engine, tmp_path: Path):
    from edge_adapt.engine import Finished

    meta, logits, state = _good_snapshot(chat, tmp_path / "good.snap")
    expected = [ev.text for ev in chat.send("And again?") if isinstance(ev, Finished)]
    (tmp_path / "v1.snap").write_bytes(_snapshot_bytes(meta, logits, state, version=1))
    chat.load(tmp_path / "v1.snap")
    assert [ev.text for ev in chat.send("And again?") if isinstance(ev, Finished)] == expected


def test_chat_survives_bad_loads_and_a_non_utf8_line(tmp_path: Path):
    """The whole chat, as a user drives it: a FIFO, a directory and a crafted file to /load, a line that is
    not UTF-8; each gets one error line and the chat answers the next message."""
    fifo = _fifo(tmp_path, "pipe.snap")
    crafted = tmp_path / "list.snap"
    crafted.write_bytes(_snapshot_bytes([1, 2], b"", b"x"))
    script = (f"/load {fifo}\n/load {tmp_path}\n/load {crafted}\n".encode() + b"caf\xe9\n" + b"What is 1 + 1?\n/exit\n")
    rc, out, err = cli("chat", "--temp", "0", "--max-tokens", "8", "--ctx", "512", stdin=script, timeout=120)
    assert rc == 1, err  # the non-UTF-8 line went unanswered (the /load failures are commands: their own)
    assert "Traceback" not in err and "unexpected" not in out + err
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # on stderr: the transcript is replies only
    assert len(errors) == 4 and "error:" not in out, (out, err)
    assert "FIFO" in errors[0] and "directory" in errors[1] and "not valid UTF-8" in errors[3]


# -- label files are validated before any work; a failed train leaves nothing ----------------------------------
def _fingerprint() -> str:
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.engine.vocab import fingerprint

    return fingerprint(inspect_gguf(default_model_path()))


def _labels(path: Path, records: list, *, model: str | None = None, header: object = None) -> Path:
    from edge_adapt.train.labels import FORMAT, VERSION

    head = header if header is not None else {"format": FORMAT, "version": VERSION, "model": model or _fingerprint()}
    path.write_text("\n".join(json.dumps(x) for x in [head, *records]) + "\n")
    return path


def _record(pid: str = "p1", **row_changes: object) -> dict:
    rows = [{"sample": i, "correct": i == 0, "target": 1.0 - i, "cut": None, "ids": [28, 29, 30]} for i in (0, 1)]
    rows.append({"sample": 0, "correct": True, "target": 1.0, "cut": 2, "ids": [28, 29]})
    for k, v in row_changes.items():
        if v is _DROP:
            del rows[0][k]
        else:
            rows[0][k] = v
    return {"problem_id": pid, "level": 1, "prompt_ids": [1, 2, 3], "rows": rows}


def _with_cut(cut: int, ids: list[int]) -> dict:
    """A record whose cut row is `ids` at `cut` (its sample's full response is [28, 29, 30])."""
    rec = _record()
    rec["rows"][2].update(cut=cut, ids=ids)
    return rec


_DROP = object()
LABEL_CASES: dict[str, Callable[[Path], Path]] = {
    "row_without_cut": lambda p: _labels(p, [_record(cut=_DROP)]),
    "row_without_ids": lambda p: _labels(p, [_record(ids=_DROP)]),
    "row_without_target": lambda p: _labels(p, [_record(target=_DROP)]),
    "row_without_sample": lambda p: _labels(p, [_record(sample=_DROP)]),
    "target_above_one": lambda p: _labels(p, [_record(target=2.0)]),
    "target_is_text": lambda p: _labels(p, [_record(target="high")]),
    "ids_are_text": lambda p: _labels(p, [_record(ids=["a", "b"])]),
    "ids_negative": lambda p: _labels(p, [_record(ids=[-1])]),
    "ids_beyond_vocab": lambda p: _labels(p, [_record(ids=[10**7])]),
    "cut_negative": lambda p: _labels(p, [_record(cut=-4)]),
    # Trained on before: the trainer reads a cut from its full response's KV, whatever the cut row's ids say.
    "cut_not_a_prefix": lambda p: _labels(p, [_with_cut(2, [29, 28])]),
    "cut_not_its_length": lambda p: _labels(p, [_with_cut(1, [28, 29])]),
    "cut_past_its_response": lambda p: _labels(p, [_with_cut(6, [28, 29, 30, 28, 29, 30])]),
    # Crashed at the first validation ("'<' not supported between instances of 'str' and 'int'").
    "level_is_text": lambda p: _labels(p, [{**_record(), "level": "1"}]),
    "level_is_a_list": lambda p: _labels(p, [{**_record(), "level": [1]}]),
    "rows_empty": lambda p: _labels(p, [{**_record(), "rows": []}]),
    "record_is_a_list": lambda p: _labels(p, [[1, 2]]),
    "no_problem_id": lambda p: _labels(p, [{k: v for k, v in _record().items() if k != "problem_id"}]),
    "no_records": lambda p: _labels(p, []),
    "other_model": lambda p: _labels(p, [_record()], model="llama:1:2:F16"),
    "wrong_format": lambda p: _labels(p, [_record()], header={"format": "something-else"}),
    "broken_json": lambda p: (p.write_text("{\"format\"\n"), p)[1],
    "not_utf8": lambda p: (p.write_bytes(b"\xff\xfe{}\n"), p)[1],
    "empty_file": lambda p: (p.write_bytes(b""), p)[1],
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_bad_labels_refused_before_any_work(case: str, tmp_path: Path, capsys):
    pytest.importorskip("peft")
    src = tmp_path / "in"
    src.mkdir()
    train = LABEL_CASES[case](src / "train.jsonl")
    val = _labels(src / "val.jsonl", [_record("p2")])
    one_error(inproc(capsys, "train", str(train), "--validation", str(val), "-o", str(tmp_path / "run")))
    nothing_left(tmp_path, "in")


# -- eval / label / tune-policy: refused early, no empty cache or report folder left --------------------------
def _suite(path: Path, rows: list[dict] | bytes) -> Path:
    path.write_bytes(rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


EVAL_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "eval_3mb_prompt": (lambda d: ["eval", "--suite", str(_suite(d / "s.jsonl", [{"prompt": "x " * 1_500_000, "answer": "1"}])),
                                   "--prompts", "1", "-k", "2"], ""),
    "eval_empty_suite": (lambda d: ["eval", "--suite", str(_suite(d / "s.jsonl", b"")), "--prompts", "1", "-k", "2"], ""),
    "eval_failing_scorer": (lambda d: ["eval", "--suite", str(_suite(d / "s.jsonl", [{"prompt": "1+1?", "answer": "2"}])),
                                       "--scorer", "math:nonexistent", "--prompts", "1", "-k", "2"], ""),
    "label_3mb_prompt": (lambda d: ["label", "-o", str(d / "l.jsonl"), "--suite",
                                    str(_suite(d / "s.jsonl", [{"prompt": "x " * 1_500_000, "answer": "1"}])),
                                    "--prompts", "1", "-k", "2"], ""),
    "label_empty_suite": (lambda d: ["label", "-o", str(d / "l.jsonl"), "--suite", str(_suite(d / "s.jsonl", b"")),
                                     "--prompts", "1", "-k", "2"], ""),
    "tune_two_prompts": (lambda d: ["tune-policy", "-o", str(d / "p.json"), "--prompts", "2"], "at least 10"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_failed_pool_command_leaves_no_folders(case: str, tmp_path: Path, capsys):
    args, fragment = EVAL_CASES[case]
    argv = args(tmp_path) + ["--cache", str(tmp_path / "cache")] + (["--out", str(tmp_path / "report")]
                                                                   if case.startswith("eval") else [])
    one_error(inproc(capsys, *argv), fragment)
    nothing_left(tmp_path, "s.jsonl") if (tmp_path / "s.jsonl").exists() else nothing_left(tmp_path)


# -- convert: shapes checked against the architecture before writing -------------------------------------------
def _checkpoint(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        from safetensors.torch import load_file, save_file

        state = load_file(str(dst / "model.safetensors"))
        state.update({k: v(state) for k, v in tensors.items()})
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


CONVERT_CASES: dict[str, tuple[dict, dict, str]] = {
    "q_proj_narrow": ({}, {"model.layers.0.self_attn.q_proj.weight": lambda s: s["model.layers.0.self_attn.q_proj.weight"][:, :-4].clone()}, "q_proj"),
    "q_proj_tall": ({}, {"model.layers.1.self_attn.q_proj.weight": lambda s: s["model.layers.1.self_attn.q_proj.weight"].repeat(2, 1)}, "q_proj"),
    "down_proj_transposed": ({}, {"model.layers.0.mlp.down_proj.weight": lambda s: s["model.layers.0.mlp.down_proj.weight"].T.contiguous()}, "down_proj"),
    "norm_wrong_width": ({}, {"model.norm.weight": lambda s: s["model.norm.weight"][:-1].clone()}, "model.norm"),
    "vocab_size_disagrees": ({"vocab_size": 1000}, {}, ""),
    "hidden_size_disagrees": ({"hidden_size": 48}, {}, "shape"),
    "layers_1000": ({"num_hidden_layers": 1000}, {}, "512"),
    "heads_not_multiple": ({"num_key_value_heads": 3}, {}, "not a multiple"),
    "heads_zero": ({"num_attention_heads": 0}, {}, "num_attention_heads"),
    "rms_eps_nan": ({"rms_norm_eps": float("nan")}, {}, "rms_norm_eps"),
    "rms_eps_negative": ({"rms_norm_eps": -1.0}, {}, "rms_norm_eps"),
    "rope_theta_negative": ({"rope_theta": -1.0, "rope_parameters": {"rope_theta": -1.0, "rope_type": "default"}}, {}, "rope_theta"),
    "odd_head_dim": ({"head_dim": 7}, {}, ""),
    "context_zero": ({"max_position_embeddings": -1}, {}, "max_position_embeddings"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_checks_shapes_before_writing(case: str, tmp_path: Path, capsys, llama_dir: Path):
    config, tensors, fragment = CONVERT_CASES[case]
    src = _checkpoint(llama_dir, tmp_path / "src", config=config, tensors=tensors)
    out = tmp_path / "out"
    out.mkdir()
    one_error(inproc(capsys, "convert", str(src), "-o", str(out / "m.gguf")), fragment)
    nothing_left(out)


@pytest.mark.parametrize("args", [["convert", "{src}", "-o", "{out}/"], ["convert-adapter", "{src}", "--base", "{src}", "-o", "{out}/"],
                                  ["label", "-o", "{out}/"], ["tune-policy", "-o", "{out}/"]])
def test_a_file_output_ending_in_a_slash_is_refused(args: list[str], tmp_path: Path, capsys):
    # Path("new/") is Path("new"): without the check the command would write a file named like the folder meant
    src, out = tmp_path / "src", tmp_path / "new"
    src.mkdir()
    one_error(inproc(capsys, *(a.format(src=src, out=out) for a in args)), "names a folder")
    assert not out.exists()
