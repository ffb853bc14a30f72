"""Small shared pieces for reading GGUF metadata and reporting progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf

# (stage, done, total): the CLI draws a bar from it; library callers may pass None.
ProgressFn = Callable[[str, int, int], None]

_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def read_gguf_kv(reader: gguf.GGUFReader, *, skip_vocab: bool = False) -> dict[str, Any]:
    """Metadata as plain Python values (the vocabulary arrays are long; skip them when not needed)."""
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (skip_vocab and key in _VOCAB_KEYS):
            continue
        kv[key] = field.contents()
    return kv
