"""GGUF -> transformers -> GGUF keeps llama.cpp's pre-tokenizer: a BPE vocabulary whose `tokenizer.ggml.pre` is
`default`, or missing (older GGUFs), is split by llama.cpp with its own default regexes, not GPT-2's. The imported
tokenizer must split text the same way, and converting it back must keep llama.cpp's tokenization."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hostile_gguf import read_kv, string, tiny_model  # noqa: E402

from edge_adapt.convert import convert_model, import_gguf  # noqa: E402
from edge_adapt.engine.default_model import default_model_path  # noqa: E402
from edge_adapt.engine.vocab import Vocab  # noqa: E402

FIXED = [
    "I'M DON'T they'RE we've you'll she'd it's", "don't", "'s's's", "rock'n'roll", "''quoted''",
    "$$$ ### @@@ !!! ??? ... ,,, ;;; ::: ---", "a+b=c; x<y>z ^~| `tick`", "!!!abc", "...and then?!",
    "1 12 123 1234 12345 123456", "1234567890123", "v1.2.3-rc4", "3.14159 and 2,718,281", " 42", "x99y",
    "a\r\nb\n\n\nc\t\t d", "   leading", "trailing   ", "x  \n  y", "\t\tb", " \n ", "    ",
    "naïve café (NFD: cafe\u0301)", "\u00a0nbsp\u2003emsp\u3000ideo", "Hello\u200bzero-width",
    "مرحبا بالعالم", "Привет, мир!", "中文测试，标点。", "日本語のテキスト…「引用」", "Ελληνικά ΑΒΓ", "한국어 텍스트",
    "²³ ½ ① ٣٤٥ १२३ １２３", "€100 £5 ¥30 ©® ™", "«guillemets» — em dash – en dash",
    "👨‍👩‍👧 family 🇫🇷 🙂🙂 ok👍", "def add(a, b):\n    return a + b  # adds\n\nprint(add(2, 40))\n",
    "if (x != 0 && y >= 10) { z += x ** 2; } // done", "<div class=\"a\">&amp;</div>", "SELECT * FROM t WHERE id=7;",
]
PIECES = [
    "a", "Z", "word", " the", "Hello", "é", "ß", "中", "字", "Ω", "я", "ع", "\u0301",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "n't", "'S",
    "!", "?", ".", ",", ";", ":", "-", "_", "(", ")", "[", "]", "{", "}", "@", "#", "%", "&", "*", "/", "\\", "\"",
    "$", "+", "<", "=", ">", "^", "~", "|", "`", "…", "，", "。", "—", "«", "€", "©",
    "0", "7", "12", "345", "6789", "10000", "123456", "²", "①", "٣",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2003",
    "🙂", "👍", "🇫🇷", "👨‍👩‍👧",
]


def _texts() -> list[str]:
    rng = random.Random(0)
    texts = list(FIXED)
    for n in range(1, 7):  # digit runs of 1 to 6, alone, after a space, a letter and punctuation
        digits = "".join(str((n * 7 + i * 3) % 10) for i in range(n))
        texts += [digits, f" {digits}", f"a{digits}b", f"({digits})", f"{digits}.{digits}"]
    texts += ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 24))) for _ in range(300)]
    return texts


def _tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    with Vocab(path) as vocab:
        return [vocab.tokenize(t, special=True, add_bos=False) for t in texts]


@pytest.mark.parametrize("pre", ["default", None])
def test_default_pre_tokenizer_imports_and_round_trips_as_llama_cpp_splits(pre: str | None, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    kv = {k: v for k, v in read_kv(default_model_path()).items() if k.startswith("tokenizer.")}
    del kv["tokenizer.ggml.pre"]
    if pre is not None:
        kv["tokenizer.ggml.pre"] = string(pre)
    original = tiny_model(kv).write(tmp_path / "m.gguf")
    texts = _texts()
    want = _tokenize(original, texts)

    import_gguf(original, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    got = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    differ = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not differ, f"{len(differ)} of {len(texts)} texts split otherwise than llama.cpp, e.g. {differ[0]}"

    back = convert_model(tmp_path / "hf", tmp_path / "back.gguf", type="f32").path
    assert read_kv(back)["tokenizer.ggml.pre"] == string("default")
    differ = [(t, g, w) for t, g, w in zip(texts, _tokenize(back, texts), want) if g != w]
    assert not differ, f"{len(differ)} of {len(texts)} texts tokenize otherwise after the round trip, e.g. {differ[0]}"
