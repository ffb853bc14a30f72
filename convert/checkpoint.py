"""Read a transformers checkpoint directory lazily: config, tokenizer files and one tensor at a time.

Only shapes are read up front (safetensors headers); a tensor's bytes are loaded when it is asked for, so
the converter holds at most a few tensors in memory.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_adapt import interrupts
from edge_adapt.errors import ModelFileError, UsageError

if TYPE_CHECKING:
    import torch


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UsageError("conversion needs torch and safetensors: pip install 'edge-adapt[train]'") from None
    return torch


def present(path: Path) -> bool:
    """Whether a file the checkpoint may hold is there: False where nothing is, True for a regular file (symlinks
    followed). Anything else by that name is an error saying what it is (a dangling link, a FIFO, a directory),
    not "missing": the user put it there and would look for a file that is."""
    from edge_adapt.fileio import check_user_file

    if not os.path.lexists(path):
        return False
    if path.is_symlink() and not path.exists():
        raise ModelFileError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist (or loops)")
    check_user_file(path, error=ModelFileError)
    return True


def read_json(path: Path, what: str, *, max_bytes: int = 64 << 20) -> dict[str, Any]:
    """The JSON object in `path` (`what` names it in messages), or one ModelFileError saying why not."""
    from edge_adapt.fileio import read_user_file

    if not present(path):
        raise ModelFileError(f"{path.parent}: {what} is missing ({path.name})")
    text = read_user_file(path, max_bytes=max_bytes, text=True, error=ModelFileError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: unreadable {what} ({exc.__class__.__name__})") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise ModelFileError(f"{path}: unreadable {what} (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a JSON object (the {what})")
    return data


@dataclass
class Checkpoint:
    """A model directory: `config`, and tensors by HF name, each loaded only on demand."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    _files: dict[str, Path]
    _stack: ExitStack = field(default_factory=ExitStack)
    _handles: dict[Path, Any] = field(default_factory=dict)
    _bin: dict[Path, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        root = Path(path)
        if not root.exists():
            raise ModelFileError(f"{root}: no such directory")
        if not root.is_dir():
            raise ModelFileError(f"{root}: not a directory (expected a transformers checkpoint folder)")
        config = read_json(root / "config.json", "model config")
        shapes, files = _index_weights(root)
        return cls(root, config, shapes, files)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._bin.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, name: str) -> torch.Tensor:
        """One tensor as float32 (bf16/f16 checkpoints are widened so every later step is exact)."""
        torch = require_torch()
        file = self._files[name]
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                # Opened per tensor: a long-lived mapping would keep every page read so far resident.
                with interrupts.not_swallowed(), safe_open(str(file), framework="pt") as fh:
                    t = fh.get_tensor(name).clone()
            else:
                if file not in self._bin:
                    self._bin[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                t = self._bin[file][name]
        except Exception as exc:  # safetensors and torch raise their own types for truncated/corrupt files
            raise ModelFileError(f"{file}: cannot read tensor {name!r} ({exc.__class__.__name__})") from None
        return t.to(torch.float32)


def _index_weights(root: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    """Map every tensor name to its shape and file, checking that every listed shard exists."""
    shapes: dict[str, tuple[int, ...]] = {}
    files: dict[str, Path] = {}
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if present(single):
        shards = [single]
    elif present(index):
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map")
        shards = sorted({root / str(v) for v in weight_map.values()})
        missing = [s.name for s in shards if not present(s)]
        if missing:
            raise ModelFileError(
                f"{root}: incomplete checkpoint, {len(missing)} shard(s) listed in the index are missing: "
                + ", ".join(missing[:3])
            )
    elif present(root / "pytorch_model.bin"):
        return _index_bin(root / "pytorch_model.bin")
    else:
        raise ModelFileError(f"{root}: no weights (model.safetensors, its index, or pytorch_model.bin)")
    from safetensors import SafetensorError, safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
                    files[name] = shard
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{shard}: unreadable safetensors file ({exc})") from None
    return shapes, files


def _index_bin(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    torch = require_torch()
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{file}: unreadable PyTorch checkpoint ({exc.__class__.__name__})") from None
    return {k: tuple(v.shape) for k, v in state.items()}, {k: file for k in state}
