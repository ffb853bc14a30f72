"""HF checkpoint -> GGUF model, one tensor at a time.

Two passes over the same `modify_tensors` hooks: the first runs them on meta tensors (shapes only) to
write the GGUF header and tensor table, the second loads, transforms, quantizes and writes each tensor and
drops it. Types the `gguf` package quantizes natively are written directly; K-quants need llama.cpp's
importance-free quantizer, so they go through `llama_model_quantize` from an f16 intermediate.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edge_adapt.convert.adapter import LoraAdapter, check_fits, load_peft_adapter, require_mergeable
from edge_adapt.fileio import atomic_file, check_not_input, check_target
from edge_adapt.convert.checkpoint import Checkpoint, require_torch
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.convert.registry import ModelBase, model_class_for
from edge_adapt.convert.tokenizer import read_hf_tokenizer
from edge_adapt.errors import ModelFileError, UsageError

if TYPE_CHECKING:
    from edge_adapt.engine.gguf_file import GGUFInfo

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --type -> (file type recorded in the GGUF, tensor type for 2-D weights)
NATIVE_TYPES: dict[str, tuple[F, Q]] = {
    "f32": (F.ALL_F32, Q.F32),
    "f16": (F.MOSTLY_F16, Q.F16),
    "bf16": (F.MOSTLY_BF16, Q.BF16),
    "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0),
    "q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
}
LLAMA_QUANT_TYPES: dict[str, F] = {"q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K}
TYPES = (*NATIVE_TYPES, *LLAMA_QUANT_TYPES)

SELF_EVAL_PREFIX = "edge_adapt.self_eval."
# Written by `import` beside the transformers files: the GGUF's edge_adapt.* metadata, keys without "edge_adapt.".
IMPORTED_METADATA = "edge_adapt.json"
# Also written by `import`: the GGUF's general.* metadata (license, organization, name...), keys without
# "general.", less what describes the file itself, which the writer sets (GENERAL_SET_BY_WRITER).
IMPORTED_GENERAL = "gguf_general.json"
GENERAL_SET_BY_WRITER = ("architecture", "type", "file_type", "quantization_version", "alignment")


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    type: str
    architecture: str
    n_tensors: int
    n_params: int
    file_size: int
    seconds: float


@dataclass(frozen=True)
class _Planned:
    hf_name: str | None  # None for tensors the class generates (extra_tensors)
    name: str
    shape: tuple[int, ...]
    qtype: Q


def tensor_type(name: str, shape: tuple[int, ...], want: Q) -> Q:
    """Norms, biases and other 1-D tensors stay f32 (llama.cpp adds them in f32); rows that do not fill a
    quantization block fall back to f16, as llama.cpp's own converter does."""
    if len(shape) < 2 or want == Q.F32:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if shape[-1] % block:
        return Q.F16
    return want


F16_MAX = 65504.0  # the largest finite f16


def check_f16_range(name: str, arr: np.ndarray, kind: str, *, use: str | None = None) -> None:
    """A finite weight beyond f16's range would be written as infinity: refused by name, with the types that hold
    it (bf16 and f32 have f32's range; q8_0 stores a block's scale, max/127, as f16). `use`: those types, where the
    command offers others (an adapter is f32 or f16)."""
    arr = np.asarray(arr)
    big = float(np.max(np.abs(arr), initial=0.0, where=np.isfinite(arr)))
    if big <= F16_MAX:
        return
    if kind in LLAMA_QUANT_TYPES:
        how, types = f", which the f16 file {kind} is quantized from cannot hold", "q8_0, bf16 or f32"
    elif kind == "f16":
        how, types = "", "bf16 or f32"
    else:  # rows that do not fill a quantization block are written as f16
        how, types = f" (its rows do not fill {kind} blocks, so it is written as f16)", "bf16 or f32"
    raise ModelFileError(f"tensor {name!r} has values beyond f16's range (|x| up to {big:.4g}){how}; "
                         f"use --type {use or types}")


def _encode(arr: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    """What add_tensor_info needs: the array shape as written, its numpy dtype, and its size in bytes."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def read_self_eval_config(source: str | os.PathLike[str] | dict[str, Any] | None) -> dict[str, Any]:
    """A flat mapping whose values GGUF can hold (str, int, float, bool, or a non-empty list of one of those),
    given as a dict or a JSON file; None is no metadata. Keys may carry the "self_eval." prefix (as in the
    edge_adapt.json `import` writes), which is dropped: write_self_eval adds it back. The keys the runtime reads are
    checked as it checks them (SelfEvalConfig.from_gguf_metadata), so no file is written that it would refuse; other
    keys are carried as they are, for other tools (the runtime reads none of them)."""
    from edge_adapt.selfeval.config import GGUF_KEYS, SelfEvalConfig

    config = read_metadata(source, what="self-eval config", prefix="self_eval.")
    what = "self-eval config" if isinstance(source, dict) else str(source)
    SelfEvalConfig.parse({k: config[k] for k in GGUF_KEYS if k in config}, what)
    return config


def read_metadata(source: str | os.PathLike[str] | dict[str, Any] | None, *, what: str, prefix: str) -> dict[str, Any]:
    """read_self_eval_config for any group of GGUF keys: `prefix` is the group's, dropped where a key has it."""
    if source is None:
        return {}
    data: Any = source
    p = Path(what)
    if not isinstance(source, dict):
        from edge_adapt.fileio import read_user_file

        p = Path(source)
        if not os.path.lexists(p):  # a link that leads nowhere (a loop, a dangling target): read_user_file says which
            raise UsageError(f"{p}: {what} not found")
        try:
            data = json.loads(read_user_file(p, max_bytes=1 << 20, text=True))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{p}: not valid JSON ({exc.__class__.__name__})") from None
        except RecursionError:  # Python's parser recurses once per level of nesting
            raise UsageError(f"{p}: not readable JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: the {what} must be a JSON object")
    for key, value in data.items():
        if not key or not all(c.isalnum() or c in "_-." for c in key):
            raise UsageError(f"{p}: bad key {key!r} (letters, digits, _ - . only)")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise UsageError(f"{p}: {key} is an empty list (GGUF arrays need at least one element)")
        kinds = {type(v) for v in items}
        if not kinds <= {str, int, float, bool} or (len(kinds) > 1 and kinds != {int, float}):
            raise UsageError(f"{p}: {key} must be a string, number, bool, or a list of one such type")
    config = {key.removeprefix(prefix): value for key, value in data.items()}
    if len(config) < len(data):
        raise UsageError(f"{p}: a key is given both with and without the {prefix} prefix")
    return config


def write_self_eval(w: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    write_metadata(w, SELF_EVAL_PREFIX, config)


def write_metadata(w: gguf.GGUFWriter, prefix: str, values: dict[str, Any]) -> None:
    """Each value (as read_metadata checked it) under prefix + its key, in the GGUF type that holds it."""
    V = gguf.GGUFValueType
    for key, value in values.items():
        k = prefix + key
        if isinstance(value, list):
            if any(isinstance(v, float) for v in value):
                w.add_key_value(k, [float(v) for v in value], V.ARRAY, sub_type=V.FLOAT32)
            elif isinstance(value[0], bool):
                w.add_key_value(k, value, V.ARRAY, sub_type=V.BOOL)
            elif isinstance(value[0], int):
                w.add_key_value(k, value, V.ARRAY, sub_type=V.INT64)
            else:
                w.add_key_value(k, value, V.ARRAY, sub_type=V.STRING)
        elif isinstance(value, bool):
            w.add_bool(k, value)
        elif isinstance(value, int):
            w.add_int64(k, value)
        elif isinstance(value, float):
            w.add_float64(k, value)
        else:
            w.add_key_value(k, value, V.STRING)  # add_string would drop an empty string


def _plan(model: ModelBase, ckpt: Checkpoint, want: Q) -> list[_Planned]:
    torch = require_torch()
    missing = [n for n in model.required_tensors() if n not in ckpt.shapes]
    if missing:
        raise ModelFileError(
            f"{ckpt.path}: incomplete checkpoint, {len(missing)} tensor(s) missing (first: {missing[0]})"
        )
    for hf_name, shape in ckpt.shapes.items():
        want_shape = None if model.is_ignored(hf_name) else model.expected_shape(hf_name)
        if want_shape is not None and tuple(shape) != want_shape:
            raise ModelFileError(f"{ckpt.path}: {hf_name} has shape {list(shape)}, config.json implies "
                                 f"{list(want_shape)}")
    plan: list[_Planned] = []
    for name, arr in model.extra_tensors():
        plan.append(_Planned(None, name, tuple(arr.shape), Q.F32))
    names = [n for n in ckpt.shapes if not model.is_ignored(n)]
    order = {n: i for i, n in enumerate(model.required_tensors())}
    for hf_name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
        gname = model.gguf_name(hf_name)
        meta = torch.empty(ckpt.shapes[hf_name], device="meta")
        for out_name, t in model.modify_tensors(meta, gname, model.block_id(gname)):
            shape = tuple(int(x) for x in t.shape)
            plan.append(_Planned(hf_name, out_name, shape, tensor_type(out_name, shape, want)))
    return _output_at_8_bits(plan, want)


def _output_at_8_bits(plan: list[_Planned], want: Q) -> list[_Planned]:
    """4-bit files keep the output matrix (token_embd when the embeddings are tied) at higher precision, as
    llama.cpp's quantizer does: it picks Q6_K and falls back to Q8_0 when rows are not a multiple of 256; the
    gguf package quantizes Q8_0 but not Q6_K, so Q8_0 it is (SmolLM2's 576-wide rows get Q8_0 either way)."""
    if want not in (Q.Q4_0, Q.Q4_1):
        return plan
    names = {p.name for p in plan}
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    return [replace(p, qtype=tensor_type(p.name, p.shape, Q.Q8_0)) if p.name == output else p for p in plan]


def convert_model_job(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type: str = "f16",
    merge_adapter: str | os.PathLike[str] | None = None,
    self_eval_config: str | os.PathLike[str] | dict[str, Any] | None = None,
    force: bool = False,
    name: str | None = None,
) -> Job[ConvertResult]:
    """Convert a transformers checkpoint directory to a GGUF model file of the given --type. `name`: its title
    (`general.name`), the checkpoint's `_name_or_path`, the name `import` kept, or the directory name if None.
    A checkpoint `import` wrote gets back the GGUF's other general.* metadata (license, organization...). As a
    job it yields Progress ("convert", then "quantize" for llama.cpp's own types); `convert_model` runs it to its
    result."""
    t0 = time.perf_counter()
    kind = type.lower()
    if kind not in TYPES:
        raise UsageError(f"unknown type {type!r}; choose one of {', '.join(TYPES)}")
    out_path = Path(out)
    check_not_input(out_path, (hf_dir, merge_adapter, None if isinstance(self_eval_config, dict) else self_eval_config))
    check_target(out_path, force=force)
    if self_eval_config is None and (Path(hf_dir) / IMPORTED_METADATA).is_file():
        self_eval_config = Path(hf_dir) / IMPORTED_METADATA  # what `import` kept of the GGUF's self-eval config
    self_eval = read_self_eval_config(self_eval_config)
    general_file = Path(hf_dir) / IMPORTED_GENERAL  # what `import` kept of the GGUF's general.* (license...)
    general = read_metadata(general_file if general_file.is_file() else None, what="general metadata", prefix="general.")
    general = {k: v for k, v in general.items() if k not in GENERAL_SET_BY_WRITER}
    require_torch()

    with Checkpoint.open(hf_dir) as ckpt:
        model = model_class_for(ckpt.config)(ckpt.config)
        vocab = read_hf_tokenizer(ckpt.path, model.hp.n_vocab, ckpt.config)
        adapter: LoraAdapter | None = None
        if merge_adapter is not None:
            adapter = load_peft_adapter(merge_adapter)
            require_mergeable(adapter)
            # What the GGUF leaves out (a tied lm_head) is no weight a delta could be merged into.
            own = {n: shape for n, shape in ckpt.shapes.items() if not model.is_ignored(n)}
            check_fits(adapter, own, f"checkpoint {ckpt.path.name}")

        if kind in NATIVE_TYPES:
            ftype, want = NATIVE_TYPES[kind]
        else:
            ftype, want = F.MOSTLY_F16, Q.F16
        plan = _plan(model, ckpt, want)

        def write(path: Path) -> Job[None]:
            return _write_gguf(path, model, ckpt, plan, vocab, ftype, self_eval, adapter, kind, name, general)

        with atomic_file(out_path, force=force) as tmp:
            if kind in NATIVE_TYPES:
                yield from write(tmp)
            else:
                # The intermediate sits beside the output so a full disk shows up before llama.cpp starts.
                fd, mid_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".f16.tmp", dir=tmp.parent)
                os.close(fd)
                mid = Path(mid_name)
                try:
                    yield from write(mid)
                    yield Progress("quantize", 0, 1)
                    _llama_quantize(mid, tmp, LLAMA_QUANT_TYPES[kind])
                    yield Progress("quantize", 1, 1)
                finally:
                    mid.unlink(missing_ok=True)
            _check_loadable(tmp, out_path)
        n_params = sum(int(np.prod(p.shape)) for p in plan)
    return ConvertResult(out_path, kind, model.gguf_arch, len(plan), n_params, out_path.stat().st_size,
                         time.perf_counter() - t0)


convert_model = to_the_end(convert_model_job)


def _check_loadable(tmp: Path, out: Path) -> None:
    """A file we would refuse to load must not be published: our own checks (header to last tensor byte, NaN),
    then llama.cpp's (vocabulary and tensor shapes), which loads it memory-mapped and frees it at once. Errors
    name the output, since the temporary file is gone by the time the message is read."""
    from edge_adapt.engine.gguf_file import inspect_gguf

    with _naming(tmp, out):
        inspect_gguf(tmp, expect="model")
    with _llama_model(tmp) as ptr:
        if ptr is None:
            raise ModelFileError(f"{out}: not written, llama.cpp refuses to load the converted file (a converter bug "
                                 "for this model; please report it)")


def check_adapter_loadable(tmp: Path, out: Path, base: GGUFInfo) -> None:
    """As `_check_loadable`, for an adapter of `base`: checked against it, then loaded by llama.cpp on top of it."""
    import llama_cpp as ll

    from edge_adapt.engine.gguf_file import check_adapter_fits, inspect_gguf

    with _naming(tmp, out):
        check_adapter_fits(base, inspect_gguf(tmp, expect="adapter"))
    with _llama_model(base.path) as ptr:
        adapter = ll.llama_adapter_lora_init(ptr, str(tmp).encode()) if ptr is not None else None
        if not adapter:
            raise ModelFileError(f"{out}: not written, llama.cpp refuses the converted adapter on {base.path.name} "
                                 "(a converter bug for this model; please report it)")
        ll.llama_adapter_lora_free(adapter)


@contextmanager
def _naming(tmp: Path, out: Path) -> Iterator[None]:
    """Our checks' errors about the temporary file, told of the output it was to become."""
    try:
        yield
    except ModelFileError as exc:
        raise ModelFileError(f"{out}: not written, {str(exc).replace(f'{tmp}: ', '')}") from None


@contextmanager
def _llama_model(path: Path) -> Iterator[Any]:
    """llama.cpp's model of `path` (None where it refuses the file), memory-mapped and freed afterwards."""
    import llama_cpp as ll

    from edge_adapt.engine.handles import init_backend

    init_backend()
    params = ll.llama_model_default_params()
    params.use_mmap = True
    params.n_gpu_layers = 0
    params.use_extra_bufts = False  # repacking the weights for the CPU kernels would read every one of them
    ptr = ll.llama_model_load_from_file(str(path).encode(), params)
    try:
        yield ptr or None
    finally:
        if ptr:
            ll.llama_model_free(ptr)


def _write_gguf(
    path: Path,
    model: ModelBase,
    ckpt: Checkpoint,
    plan: list[_Planned],
    vocab: Any,
    ftype: F,
    self_eval: dict[str, Any],
    adapter: LoraAdapter | None,
    kind: str,
    name: str | None,
    general: dict[str, Any],
) -> Job[None]:
    torch = require_torch()
    w = gguf.GGUFWriter(None, model.gguf_arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or ckpt.config.get("_name_or_path") or general.get("name") or ckpt.path.name)
        write_metadata(w, "general.", {k: v for k, v in general.items() if k != "name"})
        model.set_gguf_parameters(w)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)
        write_self_eval(w, self_eval)
        for p in plan:
            shape, dtype, nbytes = _nbytes(p.shape, p.qtype)
            w.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=None if p.qtype in (Q.F32, Q.F16) else p.qtype)

        w.open_output_file(path)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        extra = dict(model.extra_tensors())
        total = sum(int(np.prod(p.shape)) for p in plan)
        done = 0
        i = 0
        while i < len(plan):
            p = plan[i]
            if p.hf_name is None:
                outputs = [(p.name, extra[p.name])]
            else:
                data = ckpt.load(p.hf_name)
                delta = adapter.delta(p.hf_name) if adapter else None
                if delta is not None:
                    data = data + delta
                gname = model.gguf_name(p.hf_name)
                with torch.no_grad():
                    outputs = [(n, t.numpy() if hasattr(t, "numpy") else t)
                               for n, t in model.modify_tensors(data, gname, model.block_id(gname))]
                del data
            for out_name, arr in outputs:
                q = plan[i]
                if q.name != out_name or tuple(arr.shape) != q.shape:
                    raise ModelFileError(f"internal: planned {q.name}{q.shape}, produced {out_name}{arr.shape}")
                if q.qtype == Q.F16:
                    check_f16_range(out_name, arr, kind)
                w.write_tensor_data(_encode(arr, q.qtype))
                done += int(np.prod(q.shape))
                i += 1
            yield Progress("convert", done, total)
    finally:
        w.close()


def _llama_quantize(src: Path, dst: Path, ftype: F) -> None:
    import llama_cpp as ll

    from edge_adapt.engine.handles import init_backend

    init_backend(False)
    params = ll.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = min(2, os.cpu_count() or 1)
    if ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        free = _free_bytes(dst.parent)
        raise ModelFileError(f"llama.cpp could not quantize to {ftype.name.removeprefix('MOSTLY_').lower()}"
                             + (" (disk full?)" if free is not None and free < src.stat().st_size else ""))


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


__all__ = ["convert_model", "ConvertResult", "TYPES"]
