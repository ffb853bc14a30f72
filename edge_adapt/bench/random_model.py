"""Random-weight Llama GGUFs of a named shape, for speed measurements of models that cannot be shipped or fetched.

Decode speed depends on a model's shape and tensor types, not on its weights' values, so a 1B-shape model made on
the spot measures what a real Llama 3.2 1B would (on a GPU machine with no network, for instance). The tokenizer
is the embedded default model's (or one saved from it with --save-tokenizer, 1.5 MB, for a machine that cannot
hold the 94 MB default model), padded with unused tokens up to the shape's vocabulary. Weights are small normal
draws (no NaN, no overflow), norms are ones, the output layer is tied to the embeddings as in both models.

    python -m edge_adapt.bench.random_model /tmp/llama-1b.gguf --shape llama-1b
    python -m edge_adapt.bench.random_model /tmp/smollm2.gguf --shape smollm2-135m --tokenizer tokenizer.gguf
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_adapt.engine.default_model import default_model_path
from edge_adapt.errors import EdgeAdaptError, UsageError
from edge_adapt.fileio import atomic_file

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    layers: int
    embd: int
    ff: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    qtype: str  # the blocks' matrices
    embd_qtype: str  # the (tied) embedding matrix


SHAPES = {
    # the embedded default model: same shapes and tensor types, so the same speed
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 49152, 100000.0, "q4_1", "q8_0"),
    # Llama 3.2 1B as a Q8_0 GGUF is published
    "llama-1b": Shape(16, 2048, 8192, 32, 8, 128256, 500000.0, "q8_0", "q8_0"),
    "tiny": Shape(2, 64, 128, 4, 2, 49152, 10000.0, "q8_0", "q8_0"),  # for tests
}
TYPES = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
_UNUSED = 5  # llama.cpp's token type for tokens that never occur


def _tokenizer_fields(src: Path) -> dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    try:
        reader = gguf.GGUFReader(src)
    except (OSError, ValueError) as e:
        raise UsageError(f"{src}: cannot read it as a GGUF file ({e})") from None
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            out[key] = (field.contents(), field.types[0], sub)
    if "tokenizer.ggml.tokens" not in out:
        raise UsageError(f"{src} holds no tokenizer")
    return out


def _add_fields(w: gguf.GGUFWriter, fields: dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]],
                tokens: list[str], types: list[int]) -> None:
    for key, (value, vtype, sub) in fields.items():
        if key == "tokenizer.ggml.tokens":
            w.add_token_list(tokens)
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(types)
        elif vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, list(value))  # type: ignore[call-overload]
        else:
            w.add_key_value(key, value, vtype, sub)


def _write(w: gguf.GGUFWriter, path: Path, force: bool) -> None:
    with atomic_file(path, force=force) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def save_tokenizer(path: Path, *, source: Path | None = None, force: bool = False) -> Path:
    """A GGUF holding only the tokenizer of `source` (the default model when None): what --tokenizer reads."""
    fields = _tokenizer_fields(source or default_model_path())
    w = gguf.GGUFWriter(None, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    _add_fields(w, fields, list(fields["tokenizer.ggml.tokens"][0]),  # type: ignore[call-overload]
                list(fields["tokenizer.ggml.token_type"][0]))  # type: ignore[call-overload]
    _write(w, Path(path), force)
    return Path(path)


def write_random_model(path: Path, shape: Shape, qtype: str | None = None, *, tokenizer: Path | None = None,
                       seed: int = 0, force: bool = False) -> Path:
    """Write a random-weight Llama GGUF of `shape` to `path`, its blocks' matrices of type `qtype` (f16, q8_0,
    q4_0, q4_1; the shape's own when None) and the tokenizer of `tokenizer` (the default model when None)."""
    qtype = qtype or shape.qtype
    if qtype not in TYPES:
        raise UsageError(f"--type takes {', '.join(TYPES)}; got {qtype!r}")
    path = Path(path)
    tok = _tokenizer_fields(tokenizer or default_model_path())
    tokens = list(tok["tokenizer.ggml.tokens"][0])  # type: ignore[call-overload]
    if shape.vocab < len(tokens):
        raise UsageError(f"a vocabulary of {shape.vocab} is smaller than the tokenizer's {len(tokens)} tokens")
    pad = shape.vocab - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types = list(tok["tokenizer.ggml.token_type"][0]) + [_UNUSED] * pad  # type: ignore[call-overload]
    head_dim = shape.embd // shape.heads

    w = gguf.GGUFWriter(None, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"random {shape.layers} x {shape.embd} llama")
    w.add_block_count(shape.layers)
    w.add_context_length(8192)
    w.add_embedding_length(shape.embd)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(int(_FILE_TYPES[qtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_fields(w, tok, tokens, types)

    rng = np.random.default_rng(seed)
    kv = shape.kv_heads * head_dim

    def matrix(rows: int, cols: int, kind: str = qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        if TYPES[kind] == Q.F16:
            return data.astype(np.float16), Q.F16
        return gguf.quants.quantize(data, TYPES[kind]), TYPES[kind]

    def add(name: str, made: tuple[np.ndarray, gguf.GGMLQuantizationType]) -> None:
        w.add_tensor(name, made[0], raw_dtype=None if made[1] == Q.F16 else made[1])

    ones = np.ones(shape.embd, dtype=np.float32)
    add("token_embd.weight", matrix(shape.vocab, shape.embd, shape.embd_qtype))
    w.add_tensor("output_norm.weight", ones)
    for i in range(shape.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        add(f"blk.{i}.attn_q.weight", matrix(shape.embd, shape.embd))
        add(f"blk.{i}.attn_k.weight", matrix(kv, shape.embd))
        add(f"blk.{i}.attn_v.weight", matrix(kv, shape.embd))
        add(f"blk.{i}.attn_output.weight", matrix(shape.embd, shape.embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        add(f"blk.{i}.ffn_gate.weight", matrix(shape.ff, shape.embd))
        add(f"blk.{i}.ffn_up.weight", matrix(shape.ff, shape.embd))
        add(f"blk.{i}.ffn_down.weight", matrix(shape.embd, shape.ff))
    _write(w, path, force)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    p.add_argument("--type", choices=sorted(TYPES), help="the blocks' matrices (default: the shape's)")
    p.add_argument("--tokenizer", type=Path, help="a GGUF with a tokenizer (default: the embedded model)")
    p.add_argument("--save-tokenizer", action="store_true", help="write only the default model's tokenizer to OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.save_tokenizer:
            save_tokenizer(args.out, force=args.force)
        else:
            write_random_model(args.out, SHAPES[args.shape], args.type, tokenizer=args.tokenizer, seed=args.seed,
                               force=args.force)
    except EdgeAdaptError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None  # 2 for a usage error, as every command of the project
    print(args.out)


if __name__ == "__main__":
    main()
