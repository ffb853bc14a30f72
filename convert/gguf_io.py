"""Small shared pieces for reading GGUF metadata."""

from __future__ import annotations

from typing import Any

import gguf

_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def read_gguf_kv(reader: gguf.GGUFReader, *, skip_vocab: bool = False) -> dict[str, Any]:
    """Metadata as plain Python values (the vocabulary arrays are long; skip them when not needed)."""
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (skip_vocab and key in _VOCAB_KEYS):
            continue
        kv[key] = field.contents()
    return kv
