"""Snapshots on disk: a format header, JSON metadata (model fingerprint, tokens, caller's extras),
the next-token logits, llama.cpp's sequence state bytes and a CRC-32 of all that (version 2 on)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.engine.engine import Snapshot
from edge_adapt.engine.vocab import same_model
from edge_adapt.errors import EdgeAdaptError, UsageError, is_whole
from edge_adapt.fileio import atomic_output, read_user_file

MAGIC = b"EDGESNAP"
VERSION = 2
READS = (1, 2)  # version 1 had no checksum
_HEAD = struct.Struct("<8sIQQQ")  # magic, version, json bytes, logits bytes, state bytes
_CRC = struct.Struct("<I")  # after the state: zlib.crc32 of every byte before it


def _file_name(path: object) -> Path:
    """`path` as a Path, when it names a file (not None, bytes or the empty string, which is '.')."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise UsageError(f"a snapshot is a file: give its name, not {path!r:.40}")
    return Path(path)


def taken(path: str | Path) -> bool:
    """A file (or a link to one, or a dangling link) is at `path`: what saving without force refuses. Anything
    else there (a directory, a FIFO) is the file layer's to refuse, force or not."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        return False  # no file's name: save_snapshot says so
    p = Path(path)
    return p.is_file() or (p.is_symlink() and not p.exists())


def save_snapshot(snap: Snapshot, path: str | Path, *, extra: dict[str, Any] | None = None, force: bool = False) -> None:
    if not isinstance(snap, Snapshot):
        raise UsageError(f"save_snapshot takes a Snapshot (Engine.snapshot(seq) makes one), got {type(snap).__name__}")
    path = _file_name(path)
    if not force and taken(path):  # the file layer's message names the CLI's --force, not this argument
        raise UsageError(f"{path} already exists; save_snapshot(..., force=True) overwrites it")
    meta = {
        "model": snap.model_fingerprint,
        "tokens": list(snap.tokens),
        "n_past": snap.n_past,
        "extra": extra or {},
    }
    blob = json.dumps(meta).encode()
    logits = b"" if snap.logits is None else np.asarray(snap.logits, dtype=np.float32).tobytes()
    head = _HEAD.pack(MAGIC, VERSION, len(blob), len(logits), len(snap.state))
    crc = zlib.crc32(snap.state, zlib.crc32(logits, zlib.crc32(blob, zlib.crc32(head))))
    with atomic_output(path, force=force) as fh:
        for part in (head, blob, logits, snap.state, _CRC.pack(crc)):
            fh.write(part)


# A snapshot holds one sequence of one context; far larger files are not snapshots.
MAX_SNAPSHOT_BYTES = 4 << 30


def load_snapshot(path: str | Path) -> tuple[Snapshot, dict[str, Any]]:
    """Read and check a snapshot file from end to end; nothing here touches an engine.

    Every field is checked for its type and range (tokens are ints, logits whole float32s, `extra` a
    mapping), so a crafted file fails here with one line. What depends on the model (fingerprint, vocabulary,
    logits width, state bytes) is checked by `check_against`.
    """
    p = _file_name(path)
    data = read_user_file(p, max_bytes=MAX_SNAPSHOT_BYTES, error=EdgeAdaptError)
    if len(data) < _HEAD.size or data[:8] != MAGIC:
        raise EdgeAdaptError(f"{p}: not an edge-adapt snapshot")
    _, version, n_json, n_logits, n_state = _HEAD.unpack_from(data)
    if version not in READS:
        raise EdgeAdaptError(f"{p}: snapshot format version {version}, this edge-adapt reads {READS[0]} to {READS[-1]}")
    n_crc = _CRC.size if version >= 2 else 0
    if _HEAD.size + n_json + n_logits + n_state + n_crc != len(data):
        raise EdgeAdaptError(f"{p}: truncated or corrupt snapshot")
    if n_crc:
        # A flipped bit in the KV state would restore without complaint and quietly change every later token.
        (crc,) = _CRC.unpack_from(data, len(data) - n_crc)
        if zlib.crc32(memoryview(data)[: len(data) - n_crc]) != crc:
            raise EdgeAdaptError(f"{p}: corrupt snapshot (its checksum does not match its contents)")
        data = data[: len(data) - n_crc]
    if n_logits % 4:
        raise EdgeAdaptError(f"{p}: corrupt snapshot (logits are {n_logits} bytes, not whole float32 values)")
    if n_state == 0:
        raise EdgeAdaptError(f"{p}: corrupt snapshot (no sequence state)")
    at = _HEAD.size
    try:
        meta = json.loads(data[at : at + n_json].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata") from None
    if not isinstance(meta, dict):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata (not a JSON object)")
    tokens, n_past, model = meta.get("tokens"), meta.get("n_past"), meta.get("model")
    extra = meta.get("extra", {})
    if not isinstance(tokens, list) or not all(is_whole(t) and t >= 0 for t in tokens):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata (tokens must be a list of token ids)")
    if not is_whole(n_past) or n_past != len(tokens):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata (n_past {n_past!r} for {len(tokens)} tokens)")
    if not isinstance(model, str):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata (no model fingerprint)")
    if not isinstance(extra, dict):
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata (extra must be a JSON object)")
    at += n_json
    logits = np.frombuffer(data[at : at + n_logits], dtype=np.float32).copy() if n_logits else None
    if logits is not None and not np.isfinite(logits).all():
        raise EdgeAdaptError(f"{p}: corrupt snapshot (logits hold NaN or infinite values)")
    at += n_logits
    snap = Snapshot(tuple(tokens), n_past, data[at:], logits, model)
    return snap, extra


def check_against(snap: Snapshot, path: str | Path, *, fingerprint: str, n_vocab: int, n_ctx: int) -> None:
    """The snapshot fits this model and context: same model, token ids in the vocabulary, a logits row as
    wide as the vocabulary, and no more tokens than a sequence holds."""
    if not same_model(snap.model_fingerprint, fingerprint):
        raise EdgeAdaptError(f"{path}: snapshot is from another model ({snap.model_fingerprint}, this is {fingerprint})")
    bad = next((t for t in snap.tokens if t >= n_vocab), None)
    if bad is not None:
        raise EdgeAdaptError(f"{path}: snapshot holds token id {bad}, outside this model's {n_vocab} tokens")
    if snap.logits is not None and snap.logits.size != n_vocab:
        raise EdgeAdaptError(f"{path}: snapshot logits have {snap.logits.size} values for {n_vocab} tokens")
    if snap.n_past > n_ctx:
        raise EdgeAdaptError(f"{path}: snapshot holds {snap.n_past} tokens, the context holds {n_ctx}")
