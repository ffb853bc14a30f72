"""Validate a GGUF file with the `gguf` package before llama.cpp sees it, and read the facts we plan with.

llama.cpp aborts the process on some malformed files; everything it would choke on is checked here first
so that a bad file becomes a one-line ModelFileError instead of a crash in C.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.errors import ModelFileError, is_number, is_whole

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
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # ggml order: ne[0] first
    digest: str = ""  # models: what their bytes say (content_digest), so two models of one shape differ

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
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# String arrays (vocabularies, merges) are long; only these are kept, everything else is skipped and counted.
_KEEP_ARRAYS = ("adapter.alora.invocation_tokens",)
_TOKENS = "tokenizer.ggml.tokens"  # kept as raw bytes: llama.cpp compares token strings byte for byte


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string().decode("utf-8", "replace")
    if vtype == _ARRAY:
        etype, n = cur.take("<I"), cur.take("<Q")
        left = len(cur.buf) - cur.off
        if etype in _SCALARS:
            # Sized before anything is read, so a huge declared length costs nothing.
            size = struct.calcsize(_SCALARS[etype]) * n
            if size > left:
                raise ModelFileError(f"{cur.path}: truncated GGUF (array {key!r} of {n} items runs past the end)")
            values = np.frombuffer(cur.buf, dtype=_NUMPY[etype], count=n, offset=cur.off).tolist()
            cur.off += size
            return values
        # A string takes at least its 8-byte length, a nested array at least its 12-byte header.
        if etype not in (_STRING, _ARRAY) or n * (8 if etype == _STRING else 12) > left:
            if etype not in (_STRING, _ARRAY):
                raise ModelFileError(f"{cur.path}: malformed GGUF (array {key!r} has unknown item type {etype})")
            raise ModelFileError(f"{cur.path}: truncated GGUF (array {key!r} of {n} items runs past the end)")
        if key == _TOKENS and etype == _STRING:
            return _Tokens(n, tuple(cur.string() for _ in range(n)))
        keep = key in _KEEP_ARRAYS or key.startswith("edge_adapt.")
        items = [_read_value(cur, etype, key) for _ in range(n)]
        return items if keep else _Skipped(n)
    raise ModelFileError(f"{cur.path}: malformed GGUF (metadata {key!r} has unknown value type {vtype})")


@dataclass(frozen=True)
class _Skipped:
    """An array read past but not kept: only its length is known."""

    length: int


@dataclass(frozen=True)
class _Tokens(_Skipped):
    """The vocabulary: token strings as the raw bytes llama.cpp compares."""

    items: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


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
    seen: set[str] = set()
    for name, shape, type_id, offset in raw:
        if name in seen:
            raise ModelFileError(f"{path}: malformed GGUF (tensor {name!r} appears twice)")
        seen.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(f"{path}: tensor {name!r} has unknown type {type_id}") from None
        n_el = math.prod(shape)  # Python ints: a crafted shape cannot overflow into a small size
        if any(d == 0 for d in shape) or (shape and shape[0] % block):
            raise ModelFileError(f"{path}: malformed GGUF (tensor {name!r} has shape {list(shape)} for type {qtype.name})")
        n_bytes = n_el // block * type_size
        start = data_start + offset
        if start + n_bytes > file_size:
            raise ModelFileError(
                f"{path}: truncated GGUF (tensor {name!r} ends at byte {start + n_bytes}, file has {file_size})"
            )
        tensors.append(_Tensor(name, shape, qtype.name, start, n_bytes))
    # Writers end the file with the last tensor's data, padded to the alignment at most. More bytes after it mean
    # the tensor table does not describe the file: a header whose tensor count is too low leaves entries unread,
    # and the data section is then taken to start early (its checks found "NaN" in data read off its place).
    end = max((t.offset + t.n_bytes for t in tensors), default=file_size)
    if file_size - end >= alignment:
        raise ModelFileError(f"{path}: malformed GGUF ({file_size - end} bytes after the data of the {n_tensors} "
                             "tensors its header counts: is that count wrong?)")
    return kv, tensors


def inspect_gguf(path: str | os.PathLike[str], *, expect: str = "model") -> GGUFInfo:
    """Check a model (or adapter) GGUF from header to last tensor byte and return its facts. `expect`: "model",
    "adapter", or "any" (either; `kind` says which).

    Raises ModelFileError naming the file and the first problem found.
    """
    p = Path(path)
    try:
        p.stat()  # not p.exists(), which is False for a symbolic link loop or an unreadable folder too
    except FileNotFoundError:
        raise ModelFileError(f"{p}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if p.is_dir():
        raise ModelFileError(f"{p}: is a directory; a GGUF file is expected here")
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
        if expect == "model":
            raise ModelFileError(f"{p}: this is an adapter GGUF, not a model (an adapter is applied on top of "
                                 "its base model)")
        if general_type != "adapter":
            raise ModelFileError(f"{p}: not an adapter GGUF (general.type is {general_type!r})")
        adapter = {k.removeprefix("adapter."): v for k, v in kv.items() if k.startswith("adapter.")}
        if adapter.get("type") != "lora":
            raise ModelFileError(f"{p}: unsupported adapter type {adapter.get('type')!r} (only LoRA / aLoRA)")
        alpha = adapter.get("lora.alpha")
        if alpha is not None and not (is_number(alpha) and math.isfinite(alpha)):
            raise ModelFileError(f"{p}: adapter.lora.alpha is {alpha!r}, not a finite number: every score it "
                                 "gave would be NaN")
        lora_pairs(p, {t.name: t.shape for t in tensors})
        if file_size <= SCAN_DATA_BYTES:  # a NaN in an adapter makes every self-evaluation score NaN
            check_tensor_data(p, tensors)
        return GGUFInfo(
            path=p, file_size=file_size, kind="adapter", architecture=arch, name=get("general.name", p.stem),
            n_params=n_params, n_layers=0, n_embd=0, n_head=0, n_head_kv=0, head_dim_k=0, head_dim_v=0,
            n_ctx_train=0, n_vocab=0, n_ff=0, file_type=_file_type_name(get("general.file_type")),
            tensor_types=dict(type_counts), tensor_bytes=sum(t.n_bytes for t in tensors), chat_template=None,
            edge_adapt=edge_meta, adapter=adapter, tensor_shapes={t.name: t.shape for t in tensors},
        )

    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in known or arch in NOT_GENERATIVE:
        raise ModelFileError(f"{p}: unsupported architecture {arch!r} (edge-adapt runs text-generating models)")
    check_model_metadata(p, arch, kv, tensors)
    if file_size <= SCAN_DATA_BYTES:
        check_tensor_data(p, tensors)
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
        edge_adapt=edge_meta, tensor_shapes={t.name: t.shape for t in tensors}, digest=content_digest(p, tensors),
    )


def lora_pairs(path: Path, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """An adapter's lora_a / lora_b shapes by the name of the tensor they adapt. Refuses what llama-adapter.cpp
    refuses whatever the model: a tensor that is neither (norms aside, which it skips), or half a pair."""
    where = f"{path}: adapter"
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in tensor_shapes.items():
        base, dot, part = name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[part] = shape
        elif not name.endswith("_norm.weight"):  # llama.cpp skips norm tensors
            raise ModelFileError(f"{where} tensor {name!r} is not a lora_a / lora_b tensor")
    for base, pair in pairs.items():
        if len(pair) != 2:
            raise ModelFileError(f"{where} has {base}.{next(iter(pair))} without its other half")
    return pairs


def check_adapter_fits(model: GGUFInfo, adapter: GGUFInfo) -> None:
    """Refuse, before any weights are loaded, an adapter that llama.cpp would refuse for this model, naming
    the first mismatch; llama.cpp itself says only that loading failed. The checks are llama-adapter.cpp's:
    the architecture, then each lora_a / lora_b pair against the model tensor it adapts (shapes in ggml
    order: the model's (n_in, n_out), A's (n_in, r), B's (r, n_out); flipped for token_embd)."""
    where = f"{adapter.path}: adapter"
    if adapter.architecture != model.architecture:
        raise ModelFileError(f"{where} is for the {adapter.architecture!r} architecture, "
                             f"{model.path.name} is {model.architecture!r}")
    for base, pair in lora_pairs(adapter.path, adapter.tensor_shapes).items():
        target = model.tensor_shapes.get(base)
        if target is None:
            raise ModelFileError(f"{where} adapts {base!r}, which {model.path.name} does not have "
                                 "(an adapter made for another model?)")
        a, b = pair["lora_a"], pair["lora_b"]
        if len(target) != 2 or len(a) != 2 or len(b) != 2:
            fits = False
        elif base.endswith("token_embd.weight"):
            fits = (target[0], target[1]) == (b[1], a[1])
        else:
            fits = (target[0], target[1]) == (a[0], b[1]) and a[1] == b[0]
        if not fits:
            raise ModelFileError(f"{where} for {base!r} (lora_a {list(a)}, lora_b {list(b)}) does not fit "
                                 f"{model.path.name}'s {list(target)} (an adapter made for another model?)")


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


# -- what llama.cpp asserts on load, checked first ------------------------------------------------------------
LLAMA_MAX_LAYERS = 512  # llama-hparams.h
LLAMA_MAX_EXPERTS = 512  # llama-hparams.cpp
# Architectures whose rope rotates the whole head: llama.cpp's load_hparams refuses another n_rot for llama, deci
# and falcon ("invalid n_rot"), and the qwen2 graph asserts it (GGML_ASSERT(n_embd_head == n_rot), an abort).
ROPE_WHOLE_HEAD = frozenset({"llama", "deci", "falcon", "qwen2"})
# The qwen2 graph also asserts n_embd_head_v == n_embd_head_k.
SAME_K_V_HEADS = frozenset({"qwen2"})
MAX_CONTEXT = 1 << 24
SCAN_DATA_BYTES = 2 << 30  # files up to this size have their float data checked for NaN / Inf
_NO_TOKEN = (-1, 0xFFFFFFFF)  # "no such special token"


def check_model_metadata(p: Path, arch: str, kv: dict[str, Any], tensors: list[_Tensor]) -> None:
    """Refuse, with one line, what llama.cpp would abort on (GGML_ASSERT) or load and then misbehave with:
    the layer count and per-layer arrays, head counts, finite positive epsilons and rope parameters, the
    context length, a unique vocabulary with special ids inside it, and tensors that match all of that."""

    def bad(msg: str) -> ModelFileError:
        return ModelFileError(f"{p}: {msg}")

    # Every number under the architecture's keys must be finite (NaN epsilons abort in ggml_rms_norm).
    for key, value in kv.items():
        if key.startswith(f"{arch}."):
            for x in value if isinstance(value, list) else [value]:
                if isinstance(x, float) and not math.isfinite(x):
                    raise bad(f"{key} is {x}, not a finite number")

    n_layer = kv.get(f"{arch}.block_count")
    if not is_whole(n_layer) or not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise bad(f"{arch}.block_count is {n_layer!r}; llama.cpp takes 1 to {LLAMA_MAX_LAYERS} layers")

    def per_layer(suffix: str, *, required: bool, default: Any = None) -> list[int] | None:
        key = f"{arch}.{suffix}"
        v = kv.get(key, default)
        if v is None:
            if required:
                raise bad(f"GGUF lacks {key}")
            return None
        values = v if isinstance(v, list) else [v] * n_layer
        if isinstance(v, list) and len(v) != n_layer:
            raise bad(f"{key} has {len(v)} entries for {n_layer} layers")
        if not all(is_whole(x) and 0 < x < 1 << 24 for x in values):
            raise bad(f"{key} is {v!r}; expected positive counts")
        return values

    n_embd = kv.get(f"{arch}.embedding_length")
    if not is_whole(n_embd) or not 0 < n_embd < 1 << 20:
        raise bad(f"{arch}.embedding_length is {n_embd!r}")
    heads = per_layer("attention.head_count", required=True)
    kv_heads = per_layer("attention.head_count_kv", required=False, default=kv.get(f"{arch}.attention.head_count"))
    per_layer("feed_forward_length", required=False)
    assert heads is not None and kv_heads is not None
    for i, (h, hkv) in enumerate(zip(heads, kv_heads)):
        if h % hkv:
            raise bad(f"layer {i} has {h} attention heads, not a multiple of its {hkv} KV heads")
    head_k = kv.get(f"{arch}.attention.key_length")
    head_v = kv.get(f"{arch}.attention.value_length")
    for key, v in ((f"{arch}.attention.key_length", head_k), (f"{arch}.attention.value_length", head_v)):
        if v is not None and not (is_whole(v) and 0 < v < 1 << 16):
            raise bad(f"{key} is {v!r}")
    if head_k is None and n_embd % max(heads):
        raise bad(f"{arch}.embedding_length {n_embd} is not a multiple of {max(heads)} heads")
    head_dim = head_k or n_embd // max(heads)

    ctx = kv.get(f"{arch}.context_length")
    if ctx is not None and not (is_whole(ctx) and 0 < ctx <= MAX_CONTEXT):
        raise bad(f"{arch}.context_length is {ctx!r}; expected 1 to {MAX_CONTEXT}")
    for suffix in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = kv.get(f"{arch}.{suffix}")
        if eps is not None and not (is_number(eps) and 0 < eps < 1):
            raise bad(f"{arch}.{suffix} is {eps!r}; expected a small positive number")
    for suffix in ("rope.freq_base", "rope.scaling.factor", "rope.scale_linear"):
        v = kv.get(f"{arch}.{suffix}")
        if v is not None and not (is_number(v) and v > 0):
            raise bad(f"{arch}.{suffix} is {v!r}; expected a positive number")
    rope_dims = kv.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and not (is_whole(rope_dims) and 0 < rope_dims <= head_dim and rope_dims % 2 == 0):
        raise bad(f"{arch}.rope.dimension_count is {rope_dims!r} for heads of {head_dim}")
    check_experts(p, arch, kv, n_layer)

    # The vocabulary: llama.cpp asserts its token strings are unique, and reads scores / types by token id.
    vocab = kv.get(_TOKENS)
    if not isinstance(vocab, _Tokens) or vocab.length == 0:
        raise bad(f"GGUF has no vocabulary ({_TOKENS})")
    n_vocab = vocab.length
    if len(set(vocab.items)) != n_vocab:
        counts = Counter(vocab.items)
        dup = next(t for t in vocab.items if counts[t] > 1)
        raise bad(f"vocabulary holds token {dup.decode('utf-8', 'replace')!r} more than once")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = kv.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != n_vocab):
            raise bad(f"{key} has {len(v) if isinstance(v, list) else 'no'} entries for {n_vocab} tokens")
    if kv.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.merges" not in kv:
        raise bad("BPE tokenizer has no merges (tokenizer.ggml.merges); llama.cpp cannot load it")
    declared = kv.get(f"{arch}.vocab_size")
    if declared is not None and declared != n_vocab:
        raise bad(f"{arch}.vocab_size is {declared!r} but the vocabulary has {n_vocab} tokens")
    for key, v in kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if not is_whole(v) or (v not in _NO_TOKEN and not 0 <= v < n_vocab):
                raise bad(f"{key} is {v!r}, outside the vocabulary of {n_vocab} tokens")

    # Tensors: one set per declared layer, and the shapes the metadata implies.
    by_name = {t.name: t for t in tensors}
    blocks = set()
    for t in tensors:
        if t.name.startswith("blk."):
            idx = t.name.split(".")[1]
            if not idx.isdigit() or int(idx) >= n_layer:
                raise bad(f"tensor {t.name!r} is outside the {n_layer} declared layers")
            blocks.add(int(idx))
    if len(blocks) != n_layer:
        raise bad(f"{arch}.block_count declares {n_layer} layers but the file holds tensors for {len(blocks)}")
    expect: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, n_vocab), "output.weight": (n_embd, n_vocab)}
    for i in range(n_layer):
        expect[f"blk.{i}.attn_q.weight"] = (n_embd, heads[i] * head_dim)
        expect[f"blk.{i}.attn_k.weight"] = (n_embd, kv_heads[i] * head_dim)
        expect[f"blk.{i}.attn_v.weight"] = (n_embd, kv_heads[i] * (head_v or head_dim))
        expect[f"blk.{i}.attn_norm.weight"] = (n_embd,)
    for name, shape in expect.items():
        t = by_name.get(name)
        if t is not None and t.shape != shape:
            raise bad(f"tensor {name!r} has shape {list(t.shape)}, the metadata implies {list(shape)}")
    if "token_embd.weight" not in by_name:
        raise bad("GGUF lacks the token embedding (token_embd.weight)")
    # Checked after the tensors, so a head size the tensors contradict is named as that first.
    if arch in ROPE_WHOLE_HEAD and rope_dims is not None and rope_dims != head_dim:
        raise bad(f"{arch}.rope.dimension_count is {rope_dims} for heads of {head_dim}; llama.cpp's {arch} graph "
                  "rotates the whole head")
    value_dim = head_v or n_embd // max(heads)  # llama.cpp's default, as for the key length
    if arch in SAME_K_V_HEADS and value_dim != head_dim:
        raise bad(f"{arch} heads of {head_dim} for keys and {value_dim} for values; llama.cpp's {arch} graph "
                  "needs them equal")


def check_experts(p: Path, arch: str, kv: dict[str, Any], n_layer: int) -> None:
    """The expert counts as llama.cpp's load_hparams asserts them, for every architecture (a GGML_ASSERT aborts
    the process): at most LLAMA_MAX_EXPERTS experts; experts used (per layer, or one count) no more than there
    are, and some when there are experts, none when there are not; fewer expert groups than experts, the experts
    a whole number of groups, and some groups used but fewer than there are."""

    def count(suffix: str) -> int:
        key = f"{arch}.{suffix}"
        v = kv.get(key, 0)
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and len(v) != n_layer:
            raise ModelFileError(f"{p}: {key} has {len(v)} entries for {n_layer} layers")
        if not all(is_whole(x) and 0 <= x < 1 << 31 for x in values):
            raise ModelFileError(f"{p}: {key} is {v!r}; expected a count")
        return max(values, default=0)

    n_expert, n_used = count("expert_count"), count("expert_used_count")
    groups, groups_used = count("expert_group_count"), count("expert_group_used_count")
    where = f"{p}: {arch}.expert"
    if n_expert > LLAMA_MAX_EXPERTS:
        raise ModelFileError(f"{where}_count is {n_expert}; llama.cpp takes at most {LLAMA_MAX_EXPERTS} experts")
    if n_expert == 0:
        if n_used:
            raise ModelFileError(f"{where}_used_count is {n_used} but the model declares no experts "
                                 f"({arch}.expert_count)")
        if groups:
            raise ModelFileError(f"{where}_group_count is {groups} but the model declares no experts")
        return
    if n_used == 0:
        raise ModelFileError(f"{where}_count is {n_expert} but {arch}.expert_used_count is missing or 0 (a dense "
                             f"model has no {arch}.expert_count)")
    if n_used > n_expert:
        raise ModelFileError(f"{where}_used_count is {n_used}, more than the {n_expert} experts")
    if groups >= n_expert:
        raise ModelFileError(f"{where}_group_count is {groups}, not fewer than the {n_expert} experts")
    if groups > 1 and (n_expert % groups or not 0 < groups_used < groups):
        raise ModelFileError(f"{where}_group_count {groups} with {arch}.expert_group_used_count {groups_used} does "
                             f"not fit {n_expert} experts (a whole number of groups, some but not all used)")


# Where the float fields (scales, minimums) sit inside one quantized block, in bytes: (offset, numpy type).
# Integer quants cannot be NaN, so checking these fields checks the tensor. Other types are not checked.
_FLOAT_FIELDS: dict[str, tuple[tuple[int, str], ...]] = {
    "Q4_0": ((0, "<f2"),), "Q4_1": ((0, "<f2"), (2, "<f2")), "Q5_0": ((0, "<f2"),), "Q5_1": ((0, "<f2"), (2, "<f2")),
    "Q8_0": ((0, "<f2"),), "Q2_K": ((80, "<f2"), (82, "<f2")), "Q3_K": ((108, "<f2"),),
    "Q4_K": ((0, "<f2"), (2, "<f2")), "Q5_K": ((0, "<f2"), (2, "<f2")), "Q6_K": ((208, "<f2"),),
}
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


DIGEST_SLICES, DIGEST_SLICE = 8, 4096


def content_digest(p: Path, tensors: list[_Tensor]) -> str:
    """A hash of a model's header (metadata, vocabulary, template, tensor table) and of its weights: a small
    tensor whole, a large one at DIGEST_SLICES places spread over it. A fine-tune, a merged adapter or another
    quantization changes every slice; an edit of a few values inside a large tensor can go unseen. About 8 MB read
    whatever the model's size, where hashing an 8B model whole would take seconds at every start."""
    h = hashlib.sha256()
    data = np.memmap(p, dtype=np.uint8, mode="r")
    try:
        h.update(data[: min(t.offset for t in tensors)])
        for t in tensors:
            if t.n_bytes <= DIGEST_SLICES * DIGEST_SLICE:
                h.update(data[t.offset : t.offset + t.n_bytes])
                continue
            for i in range(DIGEST_SLICES):
                at = t.offset + i * (t.n_bytes - DIGEST_SLICE) // (DIGEST_SLICES - 1)
                h.update(data[at : at + DIGEST_SLICE])
    finally:
        del data
    return h.hexdigest()[:12]


def check_tensor_data(p: Path, tensors: list[_Tensor]) -> None:
    """NaN or Inf in a tensor's floats (plain float tensors, and the scales of the common quant types)."""
    import gguf

    data = np.memmap(p, dtype=np.uint8, mode="r")
    try:
        for t in tensors:
            raw = data[t.offset : t.offset + t.n_bytes]
            if t.type_name in _PLAIN:
                ok = np.isfinite(raw.view(_PLAIN[t.type_name])).all()
            elif t.type_name == "BF16":
                ok = ((raw.view("<u2") & 0x7F80) != 0x7F80).all()
            elif t.type_name in _FLOAT_FIELDS:
                _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]]
                blocks = raw.reshape(-1, size)
                ok = all(np.isfinite(np.ascontiguousarray(blocks[:, at : at + 2]).view(dt)).all()
                         for at, dt in _FLOAT_FIELDS[t.type_name])
            else:
                continue
            if not ok:
                raise ModelFileError(f"{p}: tensor {t.name!r} holds NaN or infinite values")
    finally:
        del data
