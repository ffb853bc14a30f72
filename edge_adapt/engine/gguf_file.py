"""Validate a GGUF file with the `gguf` package before llama.cpp sees it, and read the facts we plan with.

llama.cpp aborts the process on some malformed files; everything it would choke on is checked here first
so that a bad file becomes a one-line ModelFileError instead of a crash in C.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.errors import ModelFileError

GGUF_MAGIC = b"GGUF"

# Architectures llama.cpp knows but that cannot generate text turn by turn (encoders, vision towers, vocoders).
NOT_GENERATIVE = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3", "t5encoder", "clip",
     "wavtokenizer-dec", "modern-bert", "clip_vision", "clip_audio"}
)


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself: enough to plan memory and to describe the model."""

    path: Path
    file_size: int
    kind: str  # "model" or "adapter"
    architecture: str
    name: str
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    n_ff: int
    file_type: str
    tensor_types: dict[str, int]
    tensor_bytes: int
    chat_template: str | None
    edge_adapt: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_bytes_per_token_f16(self) -> int:
        """Bytes of K and V for one token of one sequence with an f16 cache."""
        return 2 * self.n_layers * self.n_head_kv * (self.head_dim_k + self.head_dim_v)


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes; any overrun is a truncated file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.off, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.off + size > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF (header or metadata cut short)")
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.off + n > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF (string runs past the end)")
        s = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return s


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# String arrays (vocabularies, merges) are long; only these are kept, everything else is skipped and counted.
_KEEP_ARRAYS = ("adapter.alora.invocation_tokens",)


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string().decode("utf-8", "replace")
    if vtype == _ARRAY:
        etype, n = cur.take("<I"), cur.take("<Q")
        keep = key in _KEEP_ARRAYS or key.startswith("edge_adapt.") or etype != _STRING
        if etype in _SCALARS and not keep:
            size = struct.calcsize(_SCALARS[etype]) * n
            if cur.off + size > len(cur.buf):
                raise ModelFileError(f"{cur.path}: truncated GGUF (array {key!r} runs past the end)")
            cur.off += size
            return _Skipped(n)
        items = [_read_value(cur, etype, key) for _ in range(n)]
        return items if keep else _Skipped(n)
    raise ModelFileError(f"{cur.path}: malformed GGUF (metadata {key!r} has unknown value type {vtype})")


@dataclass(frozen=True)
class _Skipped:
    """An array read past but not kept: only its length is known."""

    length: int


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def _scan(path: Path) -> tuple[dict[str, Any], list[_Tensor]]:
    """Parse header, metadata and tensor table, and check that every tensor lies inside the file."""
    import gguf

    with path.open("rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelFileError(f"{path}: empty file, not a GGUF") from None
    # The view is released on the way out, even when an error unwinds through it, so the map can close.
    with mm, memoryview(mm) as view:
        cur = _Cursor(view, path)
        cur.off = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFileError(f"{path}: malformed GGUF (implausible counts: {n_tensors} tensors, {n_kv} keys)")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            kv[key] = _read_value(cur, cur.take("<I"), key)
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8", "replace")
            n_dims = cur.take("<I")
            if n_dims > 8:
                raise ModelFileError(f"{path}: malformed GGUF (tensor {name!r} has {n_dims} dimensions)")
            shape = tuple(cur.take("<Q") for _ in range(n_dims))
            raw.append((name, shape, cur.take("<I"), cur.take("<Q")))
        alignment = int(kv.get("general.alignment", 32))
        data_start = -(-cur.off // alignment) * alignment
    tensors = []
    file_size = path.stat().st_size
    for name, shape, type_id, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(f"{path}: tensor {name!r} has unknown type {type_id}") from None
        n_el = int(np.prod(shape)) if shape else 1
        n_bytes = n_el // block * type_size
        start = data_start + offset
        if start + n_bytes > file_size:
            raise ModelFileError(
                f"{path}: truncated GGUF (tensor {name!r} ends at byte {start + n_bytes}, file has {file_size})"
            )
        tensors.append(_Tensor(name, shape, qtype.name, start, n_bytes))
    return kv, tensors


def inspect_gguf(path: str | os.PathLike[str], *, expect: str = "model") -> GGUFInfo:
    """Check a model (or adapter) GGUF from header to last tensor byte and return its facts.

    Raises ModelFileError naming the file and the first problem found.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"{p}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")

    import gguf

    kv, tensors = _scan(p)
    file_size = p.stat().st_size

    def get(key: str, default: Any = None) -> Any:
        return kv.get(key, default)

    if not tensors:
        raise ModelFileError(f"{p}: GGUF holds no tensors")
    type_counts = Counter(t.type_name for t in tensors)
    n_params = sum(t.n_elements for t in tensors)

    general_type = get("general.type", "model")
    arch = get("general.architecture")
    if not arch:
        raise ModelFileError(f"{p}: GGUF has no general.architecture")
    edge_meta = {k.removeprefix("edge_adapt."): v for k, v in kv.items() if k.startswith("edge_adapt.")}

    if expect == "adapter" or general_type == "adapter":
        if expect != "adapter":
            raise ModelFileError(f"{p}: this is an adapter GGUF, not a model; pass it with --adapter")
        if general_type != "adapter":
            raise ModelFileError(f"{p}: not an adapter GGUF (general.type is {general_type!r})")
        adapter = {k.removeprefix("adapter."): v for k, v in kv.items() if k.startswith("adapter.")}
        if adapter.get("type") != "lora":
            raise ModelFileError(f"{p}: unsupported adapter type {adapter.get('type')!r} (only LoRA / aLoRA)")
        return GGUFInfo(
            path=p, file_size=file_size, kind="adapter", architecture=arch, name=get("general.name", p.stem),
            n_params=n_params, n_layers=0, n_embd=0, n_head=0, n_head_kv=0, head_dim_k=0, head_dim_v=0,
            n_ctx_train=0, n_vocab=0, n_ff=0, file_type=_file_type_name(get("general.file_type")),
            tensor_types=dict(type_counts), tensor_bytes=sum(t.n_bytes for t in tensors), chat_template=None,
            edge_adapt=edge_meta, adapter=adapter,
        )

    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in known or arch in NOT_GENERATIVE:
        raise ModelFileError(f"{p}: unsupported architecture {arch!r} (edge-adapt runs text-generating models)")
    n_layers = get(f"{arch}.block_count")
    n_embd = get(f"{arch}.embedding_length")
    n_head = get(f"{arch}.attention.head_count")
    if not (n_layers and n_embd and n_head) or isinstance(n_head, _Skipped):
        raise ModelFileError(f"{p}: GGUF lacks {arch}.block_count / embedding_length / attention.head_count")
    n_head = int(max(n_head)) if isinstance(n_head, list) else int(n_head)
    n_head_kv = get(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = int(max(n_head_kv)) if isinstance(n_head_kv, list) else int(n_head_kv)
    head_dim_k = int(get(f"{arch}.attention.key_length", n_embd // n_head))
    head_dim_v = int(get(f"{arch}.attention.value_length", n_embd // n_head))
    vocab = get("tokenizer.ggml.tokens")
    n_vocab = int(get(f"{arch}.vocab_size", 0)) or (vocab.length if isinstance(vocab, _Skipped) else 0)
    if n_vocab == 0:
        raise ModelFileError(f"{p}: GGUF has no vocabulary (tokenizer.ggml.tokens)")
    template = get("tokenizer.chat_template")

    return GGUFInfo(
        path=p, file_size=file_size, kind="model", architecture=arch, name=get("general.name", p.stem),
        n_params=n_params, n_layers=int(n_layers), n_embd=int(n_embd), n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ctx_train=int(get(f"{arch}.context_length", 0)),
        n_vocab=n_vocab, n_ff=int(_scalar(get(f"{arch}.feed_forward_length", 4 * n_embd))),
        file_type=_file_type_name(get("general.file_type")), tensor_types=dict(type_counts),
        tensor_bytes=sum(t.n_bytes for t in tensors), chat_template=template if isinstance(template, str) else None,
        edge_adapt=edge_meta,
    )


def _scalar(value: Any) -> Any:
    """Per-layer values (lists) planned for by their largest entry."""
    if isinstance(value, _Skipped):
        return 0
    return max(value) if isinstance(value, list) else value


def _file_type_name(value: Any) -> str:
    import gguf

    if value is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {value}"
