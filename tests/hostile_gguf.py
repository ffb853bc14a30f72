"""Build corrupted GGUF files byte by byte (the `gguf` writer refuses most of what a hostile file holds).

`tiny_model()` is a 2-layer llama with the embedded model's tokenizer (so llama.cpp loads it) and tensors of a
few MB; each test changes one thing in its metadata or tensors and writes it with `write()`. Nothing here
is committed as a file: every corrupted input is built in the test's tmp_path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def _str(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def scalar(vtype: int, value: object) -> tuple[int, bytes]:
    return vtype, struct.pack(_FMT[vtype], value)


def string(value: str | bytes) -> tuple[int, bytes]:
    return STR, _str(value)


def array(etype: int, items: list, *, declared: int | None = None) -> tuple[int, bytes]:
    """An array value; `declared` writes a different item count than the items given (a lie)."""
    n = len(items) if declared is None else declared
    body = b"".join(_str(x) if etype == STR else struct.pack(_FMT[etype], x) for x in items)
    return ARR, struct.pack("<IQ", etype, n) + body


def _skip(buf: bytes, off: int, vtype: int) -> int:
    if vtype in _FMT:
        return off + struct.calcsize(_FMT[vtype])
    if vtype == STR:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    etype, n = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype in _FMT:
        return off + n * struct.calcsize(_FMT[etype])
    for _ in range(n):
        off = _skip(buf, off, etype)
    return off


def read_kv(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every metadata entry of a GGUF as (type, raw value bytes), in file order."""
    buf = path.read_bytes()[: 8 << 20]  # the metadata of the embedded model sits in its first MBs
    _, _, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    off, kv = 24, {}
    for _ in range(n_kv):
        klen = struct.unpack_from("<Q", buf, off)[0]
        key = buf[off + 8 : off + 8 + klen].decode()
        off += 8 + klen
        vtype = struct.unpack_from("<I", buf, off)[0]
        end = _skip(buf, off + 4, vtype)
        kv[key] = (vtype, buf[off + 4 : end])
        off = end
    return kv


def strings(raw: bytes) -> list[bytes]:
    """The items of a raw string array value."""
    _, n = struct.unpack_from("<IQ", raw, 0)
    off, out = 12, []
    for _ in range(n):
        k = struct.unpack_from("<Q", raw, off)[0]
        out.append(raw[off + 8 : off + 8 + k])
        off += 8 + k
    return out


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    type: int
    data: bytes


@dataclass
class GGUF:
    kv: dict[str, tuple[int, bytes]]
    tensors: list[Tensor] = field(default_factory=list)
    n_tensors: int | None = None  # a lie in the header when set

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def write(self, path: Path) -> Path:
        head = struct.pack("<4sIQQ", b"GGUF", 3, len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kv))
        meta = b"".join(_str(k) + struct.pack("<I", v[0]) + v[1] for k, v in self.kv.items())
        infos, offset, datas = [], 0, []
        for t in self.tensors:
            infos.append(_str(t.name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
                         + struct.pack("<IQ", t.type, offset))
            pad = -len(t.data) % 32
            datas.append(t.data + b"\0" * pad)
            offset += len(t.data) + pad
        blob = head + meta + b"".join(infos)
        blob += b"\0" * (-len(blob) % 32)
        path.write_bytes(blob + b"".join(datas))
        return path


N_EMBD, N_HEAD, N_HEAD_KV, HEAD, N_FF, N_LAYER = 32, 4, 2, 8, 64, 2


def _f32(shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.2) -> bytes:
    return (rng.standard_normal(shape[::-1]) * scale).astype("<f4").tobytes()


def tiny_model(tokenizer: dict[str, tuple[int, bytes]]) -> GGUF:
    """A loadable 2-layer llama (32 wide, 4 heads / 2 KV heads) over `tokenizer` (the embedded model's)."""
    rng = np.random.default_rng(0)
    n_vocab = struct.unpack_from("<IQ", tokenizer["tokenizer.ggml.tokens"][1], 0)[1]
    kv = {
        "general.architecture": string("llama"),
        "general.name": string("tiny hostile llama"),
        "llama.block_count": scalar(U32, N_LAYER),
        "llama.context_length": scalar(U32, 2048),
        "llama.embedding_length": scalar(U32, N_EMBD),
        "llama.feed_forward_length": scalar(U32, N_FF),
        "llama.attention.head_count": scalar(U32, N_HEAD),
        "llama.attention.head_count_kv": scalar(U32, N_HEAD_KV),
        "llama.rope.freq_base": scalar(F32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": scalar(F32, 1e-5),
        "llama.vocab_size": scalar(U32, n_vocab),
        "llama.rope.dimension_count": scalar(U32, HEAD),
        "general.file_type": scalar(U32, 1),
        **tokenizer,
    }
    emb = (rng.standard_normal((n_vocab, N_EMBD)) * 0.2).astype("<f2").tobytes()
    tensors = [Tensor("token_embd.weight", (N_EMBD, n_vocab), GGML_F16, emb),
               Tensor("output_norm.weight", (N_EMBD,), GGML_F32, np.ones(N_EMBD, "<f4").tobytes())]
    for i in range(N_LAYER):
        for name, shape in (("attn_norm", (N_EMBD,)), ("attn_q", (N_EMBD, N_HEAD * HEAD)),
                            ("attn_k", (N_EMBD, N_HEAD_KV * HEAD)), ("attn_v", (N_EMBD, N_HEAD_KV * HEAD)),
                            ("attn_output", (N_HEAD * HEAD, N_EMBD)), ("ffn_norm", (N_EMBD,)),
                            ("ffn_gate", (N_EMBD, N_FF)), ("ffn_up", (N_EMBD, N_FF)), ("ffn_down", (N_FF, N_EMBD))):
            data = np.ones(shape, "<f4").tobytes() if name.endswith("norm") else _f32(shape, rng)
            tensors.append(Tensor(f"blk.{i}.{name}.weight", shape, GGML_F32, data))
    return GGUF(kv, tensors)
