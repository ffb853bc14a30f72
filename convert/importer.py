"""GGUF -> transformers checkpoint: dequantize each tensor, undo the layout changes, write safetensors.

This is how training gets a trainable copy of a GGUF-only model (the embedded default model ships only as
Q4_1). Weights are written as float32: dequantized values are exact in f32, so converting the result back
with `--type f32` reproduces the quantized model's weights bit for bit.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_adapt.fileio import atomic_dir, check_replaceable, check_target
from edge_adapt.convert.gguf_io import read_gguf_kv
from edge_adapt.convert.model import GENERAL_SET_BY_WRITER, IMPORTED_GENERAL, IMPORTED_METADATA, read_metadata
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.convert.registry import model_class_for_gguf
from edge_adapt.convert.tokenizer import build_hf_tokenizer
from edge_adapt.errors import ModelFileError, UsageError


@dataclass(frozen=True)
class ImportResult:
    path: Path
    architecture: str
    n_tensors: int
    n_params: int
    seconds: float


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    shape = tuple(int(x) for x in reversed(t.shape))
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(t.data).astype(np.float32).reshape(shape)
    try:
        return gguf.quants.dequantize(t.data, qtype).astype(np.float32, copy=False).reshape(shape)
    except NotImplementedError:
        raise ModelFileError(f"tensor {t.name!r}: cannot dequantize type {qtype.name}") from None


def import_gguf_job(
    model: str | os.PathLike[str] | None, out: str | os.PathLike[str], *, force: bool = False
) -> Job[ImportResult]:
    """Write `out/` (config.json, model.safetensors, tokenizer files) from a GGUF; None means the default model.
    As a job it yields Progress ("import", per tensor written); `import_gguf` runs it to its result."""
    from edge_adapt.engine.gguf_file import inspect_gguf

    t0 = time.perf_counter()
    out_path = Path(out)
    if model is None:
        from edge_adapt.engine.default_model import default_model_path

        model = default_model_path()
    # It is replaced as a whole: never the directory the process works in, nor one holding the model read.
    check_replaceable(out_path, inputs=(model,))
    check_target(out_path, force=force, directory=True)  # before the work (atomic_dir checks again after it)
    info = inspect_gguf(model, expect="model")
    cls = model_class_for_gguf(info.architecture)
    reader = gguf.GGUFReader(info.path)
    kv = read_gguf_kv(reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelFileError(f"{info.path}: importing rope-frequency-scaled (Llama 3.1 style) models is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelFileError(f"{info.path}: no token_embd.weight")
    n_vocab = int(embd.shape[1])
    config = cls.hf_config(kv, n_vocab, names)
    arch = cls(config)

    # safetensors layout: 8-byte header length, JSON header (offsets relative to the data start), raw data.
    entries = []
    offset = 0
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        size = int(np.prod(shape)) * 4
        entries.append((t, arch.hf_name(t.name), shape, offset, offset + size))
        offset += size
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for _, hf, shape, begin, end in entries:
        header[hf] = {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    with atomic_dir(out_path, force=force) as tmp:
        with open(tmp / "model.safetensors", "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for i, (t, _, shape, _, _) in enumerate(entries):
                arr = arch.restore_tensor(_dequantize(t), t.name)
                np.ascontiguousarray(arr, dtype="<f4").tofile(fh)
                yield Progress("import", i + 1, len(entries))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        build_hf_tokenizer(kv, tmp)
        if info.edge_adapt:
            # Runtime metadata the GGUF carried (e.g. a self-eval config): kept so a round trip can restore it.
            (tmp / IMPORTED_METADATA).write_text(json.dumps(info.edge_adapt, indent=2) + "\n", encoding="utf-8")
        general = {k.removeprefix("general."): v for k, v in kv.items() if k.startswith("general.")
                   and k.removeprefix("general.") not in GENERAL_SET_BY_WRITER and _convert_takes(k, v)}
        if general:  # the license, organization and name, so that `convert` writes them back
            (tmp / IMPORTED_GENERAL).write_text(json.dumps(general, indent=2) + "\n", encoding="utf-8")
    n_params = sum(int(np.prod(s)) for _, _, s, _, _ in entries)
    return ImportResult(out_path, info.architecture, len(entries), n_params, time.perf_counter() - t0)



def _convert_takes(key: str, value: object) -> bool:
    """Whether `convert` can write this metadata back (nested arrays, say, it cannot: they are left out)."""
    try:
        read_metadata({key: value}, what="general metadata", prefix="")
    except UsageError:
        return False
    return True


import_gguf = to_the_end(import_gguf_job)