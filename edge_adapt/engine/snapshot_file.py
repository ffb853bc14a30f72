"""Snapshots on disk: a format header, JSON metadata (model fingerprint, tokens, caller's extras),
the next-token logits and llama.cpp's sequence state bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.engine.engine import Snapshot
from edge_adapt.errors import EdgeAdaptError
from edge_adapt.fileio import atomic_output

MAGIC = b"EDGESNAP"
VERSION = 1
_HEAD = struct.Struct("<8sIQQQ")  # magic, version, json bytes, logits bytes, state bytes


def save_snapshot(snap: Snapshot, path: str | Path, *, extra: dict[str, Any] | None = None, force: bool = False) -> None:
    meta = {
        "model": snap.model_fingerprint,
        "tokens": list(snap.tokens),
        "n_past": snap.n_past,
        "extra": extra or {},
    }
    blob = json.dumps(meta).encode()
    logits = b"" if snap.logits is None else np.asarray(snap.logits, dtype=np.float32).tobytes()
    with atomic_output(path, force=force) as fh:
        fh.write(_HEAD.pack(MAGIC, VERSION, len(blob), len(logits), len(snap.state)))
        fh.write(blob)
        fh.write(logits)
        fh.write(snap.state)


def load_snapshot(path: str | Path) -> tuple[Snapshot, dict[str, Any]]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise EdgeAdaptError(f"{p}: no such file") from None
    except OSError as exc:
        raise EdgeAdaptError(f"{p}: cannot read ({exc.strerror})") from None
    if len(data) < _HEAD.size or data[:8] != MAGIC:
        raise EdgeAdaptError(f"{p}: not an edge-adapt snapshot")
    _, version, n_json, n_logits, n_state = _HEAD.unpack_from(data)
    if version != VERSION:
        raise EdgeAdaptError(f"{p}: snapshot format version {version}, this edge-adapt reads {VERSION}")
    if _HEAD.size + n_json + n_logits + n_state != len(data):
        raise EdgeAdaptError(f"{p}: truncated or corrupt snapshot")
    at = _HEAD.size
    try:
        meta = json.loads(data[at : at + n_json])
    except ValueError:
        raise EdgeAdaptError(f"{p}: corrupt snapshot metadata") from None
    at += n_json
    logits = np.frombuffer(data[at : at + n_logits], dtype=np.float32).copy() if n_logits else None
    at += n_logits
    snap = Snapshot(tuple(meta["tokens"]), int(meta["n_past"]), data[at:], logits, meta["model"])
    return snap, meta.get("extra", {})
