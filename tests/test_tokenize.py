"""A long text is tokenized in pieces cut between special tokens (linear time; llama.cpp's own split is
quadratic in their number), token for token as llama.cpp tokenizes it whole: checked against one whole call
on texts dense in special tokens that overlap, nest and sit next to whitespace, for a BPE and a SentencePiece
vocabulary."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from edge_adapt.engine.default_model import default_model_path
from edge_adapt.engine.handles import CUT_ABOVE_BYTES, Model, init_backend
from edge_adapt.engine.special_cuts import Special, safe_cuts
from hostile_gguf import ARR, F32, I32, STR, U32, array, read_kv, scalar, string, strings, tiny_model

CONTROL, USER_DEFINED, NORMAL, BYTE = 3, 4, 1, 6


def _model(path: Path) -> Model:
    init_backend()
    return Model(path, vocab_only=True)


def _bpe_with_overlapping_specials(tmp_path: Path) -> tuple[Path, list[str]]:
    """The embedded model's tokenizer, with some plain tokens made user-defined: pieces that overlap and
    contain one another ("ab", "ba", "aba", "<", "im"), so the split's order and its leftmost-first matching
    decide what a text becomes."""
    kv = {k: v for k, v in read_kv(default_model_path()).items() if k.startswith("tokenizer.")}
    texts = strings(kv["tokenizer.ggml.tokens"][1])
    types = list(struct.unpack_from(f"<{len(texts)}i", kv["tokenizer.ggml.token_type"][1], 12))
    chosen = ["ab", "ba", "aba", "<", "im", "end", "the"]
    for t in chosen:
        types[texts.index(t.encode())] = USER_DEFINED
    kv["tokenizer.ggml.token_type"] = array(I32, types)
    path = tiny_model(kv).write(tmp_path / "bpe.gguf")
    return path, chosen + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _spm(tmp_path: Path) -> tuple[Path, list[str]]:
    """A small SentencePiece vocabulary (byte fallback, a space prefix) with control and user-defined tokens."""
    pieces = ["\u2581", "a", "b", "ab", "ba", "\u2581a", "\u2581b", "\u2581ab", "c", "\u2581c"]
    specials = {"<|x|>": CONTROL, "<|xy|>": CONTROL, "ab|": USER_DEFINED, "|": USER_DEFINED}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces + list(specials)
    types = [2, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces) + list(specials.values())
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * len(specials)
    kv = {
        "tokenizer.ggml.model": string("llama"),
        "tokenizer.ggml.tokens": array(STR, tokens),
        "tokenizer.ggml.scores": array(F32, scores),
        "tokenizer.ggml.token_type": array(I32, types),
        "tokenizer.ggml.bos_token_id": scalar(U32, 1),
        "tokenizer.ggml.eos_token_id": scalar(U32, 2),
        "tokenizer.ggml.unknown_token_id": scalar(U32, 0),
    }
    assert all(v[0] in (STR, ARR, U32) for v in kv.values())
    path = tiny_model(kv).write(tmp_path / "spm.gguf")
    return path, list(specials) + ["<s>", "</s>"]


def _texts(specials: list[str], seed: int, n: int = 6) -> list[str]:
    rng = random.Random(seed)
    parts = specials * 3 + ["a", "b", "c", " ", "  ", "\n", " a", "b ", "hello", "é", "東京", "🙂", "12"]
    out = []
    while len(out) < n:
        text = "".join(rng.choice(parts) for _ in range(rng.randint(4000, 12000)))
        if len(text.encode()) > CUT_ABOVE_BYTES:
            out.append(text)
    return out


@pytest.mark.parametrize("vocab", ["default", "bpe-overlapping", "spm"])
def test_long_text_in_pieces_is_tokenized_as_whole(vocab: str, tmp_path: Path) -> None:
    if vocab == "default":
        path, specials = default_model_path(), ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>"]
    elif vocab == "bpe-overlapping":
        path, specials = _bpe_with_overlapping_specials(tmp_path)
    else:
        path, specials = _spm(tmp_path)
    model = _model(path)
    try:
        pieces = 0
        for seed, text in enumerate(_texts(specials, seed=len(vocab))):
            data = text.encode()
            for parse_special in (True, False):
                pieces += len(model._cuts(data, parse_special, add_special=False)) + 1
                for add_special in (False, True):
                    whole = model._tokenize(data, add_special=add_special, parse_special=parse_special)
                    cut = model.tokenize(text, add_special=add_special, parse_special=parse_special)
                    assert cut == whole, (vocab, seed, parse_special, add_special)
        assert pieces > 40  # the texts were cut (about 256 special tokens a piece), not tokenized whole
    finally:
        model.close()


def test_cuts_only_where_nothing_else_reaches_across() -> None:
    ab, b, long = Special(b"ab", False), Special(b"b", False), Special(b"xaby", False)
    assert safe_cuts(b"ab.ab.ab", [ab], every=1) == [2, 5, 8]
    assert safe_cuts(b"ab.xaby.ab", [ab, long], every=1) == [2, 7, 10]  # not inside the longer token's text
    assert safe_cuts(b"ab.ab", [ab, b], every=1) == [2, 5]  # a shorter token inside: taken by "ab" first
    assert safe_cuts(b"aab", [Special(b"aa", False), ab], every=1) == []  # "aa" and "ab" overlap: either may win
    assert safe_cuts(b"ab ab", [Special(b"ab", True)], every=1) == []  # rstrip eats what follows
    assert safe_cuts(b"x ab", [Special(b" ab", False)], every=1) == []  # whitespace at a token's edge
    assert safe_cuts(b"ab.ab.ab.ab", [ab], every=2) == [5, 11]


def test_vocabulary_calls_share_the_model_and_freeing_it_waits_for_them() -> None:
    """A long tokenization (on the server's tokenizer thread) holds the model shared: the decode loop's token
    lookups get in beside it, and only freeing the model waits for it to end."""
    import threading

    from edge_adapt.engine.handles import SharedLock

    lock = SharedLock()
    inside, leave, freed = threading.Event(), threading.Event(), threading.Event()

    def tokenizing() -> None:
        with lock.shared():
            inside.set()
            leave.wait(10)

    def lookup() -> None:
        with lock.shared():
            pass

    def free() -> None:
        with lock.exclusive():
            freed.set()

    threading.Thread(target=tokenizing).start()
    assert inside.wait(5)
    beside = threading.Thread(target=lookup)
    beside.start()
    beside.join(5)
    assert not beside.is_alive()  # did not wait for the tokenization
    closer = threading.Thread(target=free)
    closer.start()
    assert not freed.wait(0.3)  # waits for it
    leave.set()
    assert freed.wait(5)
    closer.join(5)


def test_at_most_so_many_tokens_is_refused_at_the_first_piece_past_it() -> None:
    from edge_adapt.errors import ContextOverflowError

    model = _model(default_model_path())
    try:
        text = "<|im_end|>" * 20_000
        assert len(model.tokenize(text, add_special=False, parse_special=True, most=20_000)) == 20_000
        with pytest.raises(ContextOverflowError, match=r"longer than 100 tokens \(256 in its first 2560 of 200000 bytes\)"):
            model.tokenize(text, add_special=False, parse_special=True, most=100)
        with pytest.raises(ContextOverflowError):
            model.tokenize("x" * 1000, add_special=False, parse_special=True, most=100)  # one piece: whole
    finally:
        model.close()
