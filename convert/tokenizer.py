"""Tokenizers both ways: HF `tokenizer.json` -> GGUF `tokenizer.ggml.*`, and GGUF -> a transformers tokenizer.

llama.cpp does not run the HF tokenizer; it re-implements a fixed set of pre-tokenizers (regex splits)
chosen by `tokenizer.ggml.pre`. So a tokenizer converts only if its pre-tokenizer is one llama.cpp knows;
anything else is refused rather than silently tokenized differently. The structure of the HF pre-tokenizer
is compared (not a hash of sample ids, as llama.cpp's script does), so a retrained vocabulary still matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edge_adapt.errors import ModelFileError, is_whole

# The split regexes, exactly as HF tokenizer.json files spell them.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's split when a BPE vocabulary names no pre-tokenizer it knows (LLAMA_VOCAB_PRE_TYPE_DEFAULT, also taken
# when tokenizer.ggml.pre is missing, as in older GGUFs): four regexes, each splitting the pieces the one before left
# (src/llama-vocab.cpp). It is not GPT-2's: punctuation runs, then digit runs, then 3-digit groups split off.
# The second is GPT-2's; llama.cpp runs it as code that also takes a lone whitespace run, as HF's `|\s+` does.
DEFAULT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

_BYTELEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTELEVEL_PLAIN = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# llama.cpp pre-tokenizer name (as llama.cpp spells it) -> the HF pre_tokenizer that splits text the same way.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "default": {"type": "Sequence", "pretokenizers": [*map(_split, DEFAULT_REGEXES), _BYTELEVEL_PLAIN]},
    "gpt-2": _BYTELEVEL_REGEX,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL_REGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _BYTELEVEL_PLAIN]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _BYTELEVEL_PLAIN]},
}
# The one pre-tokenizer for which llama.cpp takes a whole word that is in the vocabulary as it is, before merging
# (HF's BPE `ignore_merges`); for every other it always merges.
IGNORES_MERGES = "llama-bpe"


def _object(value: Any, field: str) -> dict[str, Any]:
    """`value` if it is a JSON object; else a ModelFileError naming the field (the caller adds the file)."""
    if not isinstance(value, dict):
        raise ModelFileError(f"{field} must be a JSON object, got {json.dumps(value)[:40]}")
    return value


def _canon(pre: dict[str, Any] | None) -> tuple[Any, ...]:
    """The parts of a pre-tokenizer that change where text is split (offsets trimming does not)."""
    if pre is None:
        return ()
    pre = _object(pre, "pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        raise ModelFileError(f"pre_tokenizer.pretokenizers must be a list, got {json.dumps(steps)[:40]}")
    out: list[Any] = []
    for i, step in enumerate(steps):
        s = _object(step, f"pre_tokenizer.pretokenizers[{i}]")
        kind = s.get("type")
        if kind == "ByteLevel":
            out.append((kind, bool(s.get("add_prefix_space", True)), bool(s.get("use_regex", True))))
        elif kind == "Digits":
            out.append((kind, bool(s.get("individual_digits", False))))
        elif kind == "Split":
            pattern = _object(s.get("pattern", {}), "pre_tokenizer Split pattern")
            out.append((kind, pattern.get("Regex", pattern.get("String")), str(s.get("behavior", "")).lower(),
                        bool(s.get("invert", False))))
        else:
            out.append((kind, json.dumps(s, sort_keys=True)))
    return tuple(out)


def identify_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    target = _canon(pre)
    for name, known in PRE_TOKENIZERS.items():
        if _canon(known) == target:
            return name
    kinds = "+".join(str(step[0]) for step in target) or "none"
    raise ModelFileError(
        f"tokenizer pre-tokenizer ({kinds}) matches none llama.cpp implements "
        f"({', '.join(PRE_TOKENIZERS)}); converting it would tokenize differently"
    )


@dataclass
class GGUFVocab:
    """Everything llama.cpp reads about a tokenizer, ready to write."""

    model: str
    pre: str
    tokens: list[str]
    toktypes: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.toktypes)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            w.add_uint32(f"tokenizer.ggml.{kind}_token_id", tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_hf_tokenizer(root: Path, n_vocab: int, config: dict[str, Any]) -> GGUFVocab:
    """Read tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a checkpoint directory."""
    from edge_adapt.convert.checkpoint import present, read_json

    path = root / "tokenizer.json"
    if not present(path):
        raise ModelFileError(f"{root}: tokenizer missing (no tokenizer.json; save it with tokenizer.save_pretrained)")
    config_path = root / "tokenizer_config.json"
    tj = read_json(path, "tokenizer file", max_bytes=256 << 20)
    tcfg = read_json(config_path, "tokenizer file") if present(config_path) else {}
    model = tj.get("model") or {}
    if not isinstance(model, dict):
        raise ModelFileError(f"{path}: model is not a JSON object")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelFileError(
            f"{path}: only byte-level BPE tokenizers are supported (found {model.get('type')!r}"
            f"{' with byte_fallback' if model.get('byte_fallback') else ''})"
        )
    normalizer = tj.get("normalizer")
    # NFC is harmless: llama.cpp skips it, which differs only on text that is not already NFC.
    if normalizer is not None and _named(path, normalizer, "normalizer").get("type") != "NFC":
        raise ModelFileError(f"{path}: normalizer {normalizer.get('type')!r} has no llama.cpp equivalent")
    with _naming(path):
        pre = identify_pre_tokenizer(tj.get("pre_tokenizer"))
    ignore_merges = bool(model.get("ignore_merges", False))
    if ignore_merges != (pre == IGNORES_MERGES):
        does = "takes a word found whole in the vocabulary as it is" if pre == IGNORES_MERGES else "always merges"
        raise ModelFileError(f"{path}: model.ignore_merges is {ignore_merges}, but llama.cpp {does} with the {pre} "
                             "pre-tokenizer")

    vocab: dict[str, int] = model.get("vocab") or {}
    added = tj.get("added_tokens") or []
    _check_vocab(path, vocab, added)
    top = max([*vocab.values(), *(a["id"] for a in added)], default=-1)
    if top >= n_vocab:
        raise ModelFileError(f"{path}: tokenizer has ids up to {top} but the model's vocab_size is {n_vocab}")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for text, tid in vocab.items():
        tokens[tid] = text
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows beyond the tokenizer (padding to a round size)
            tokens[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED

    merges = _merges(path, model.get("merges") or [])
    if not merges:
        raise ModelFileError(f"{path}: BPE tokenizer has no merges (model.merges); llama.cpp cannot load it")
    ids = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for kind, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        text = _token_text(tcfg.get(key))
        if text is not None and text in ids:
            special[kind] = ids[text]
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = config.get(key)
        if kind not in special and isinstance(value, int) and 0 <= value < n_vocab:
            special[kind] = value

    with _naming(path):
        add_bos, add_eos = _template_adds(tj.get("post_processor"))
    template = _chat_template(root, config_path, tcfg.get("chat_template"))
    return GGUFVocab(
        model="gpt2", pre=pre, tokens=[str(t) for t in tokens], toktypes=[int(t) for t in types], merges=merges,
        special_ids=special, add_bos=add_bos, add_eos=add_eos, chat_template=template,
    )


def _chat_template(root: Path, config_path: Path, template: Any) -> str | None:
    """The chat template: chat_template.jinja beside the config (transformers >= 4.50 saves it there), else the
    config's `chat_template`, a string or a list of named templates of which llama.cpp reads the default one."""
    from edge_adapt.fileio import read_user_file

    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return read_user_file(jinja, max_bytes=16 << 20, text=True, error=ModelFileError)
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                          and isinstance(t.get("template"), str) for t in template):
        return next((t["template"] for t in template if t["name"] == "default"), None)
    raise ModelFileError(f"{config_path}: chat_template must be a string or a list of named templates "
                         f"({{\"name\": ..., \"template\": ...}}), got {template!r:.40}")


def _check_vocab(path: Path, vocab: Any, added: Any) -> None:
    """Token ids are whole numbers, each one token's (a GGUF holds one text per id: a second would silently take
    the first's place); added tokens are objects llama.cpp can honour."""
    if not isinstance(vocab, dict) or not all(is_whole(i) and i >= 0 for i in vocab.values()):
        raise ModelFileError(f"{path}: model.vocab must map each token to a whole number >= 0")
    if not isinstance(added, list):
        raise ModelFileError(f"{path}: added_tokens must be a list")
    text_of: dict[int, str] = {}
    for text, tid in vocab.items():
        if tid in text_of:
            raise ModelFileError(f"{path}: model.vocab gives id {tid} to both {text_of[tid]!r} and {text!r}; "
                                 "an id names one token")
        text_of[tid] = text
    for a in added:
        if not (isinstance(a, dict) and isinstance(a.get("content"), str) and is_whole(a.get("id")) and a["id"] >= 0):
            raise ModelFileError(f"{path}: added_tokens entry {a!r:.60} needs a string content and a whole id >= 0")
        had = text_of.setdefault(a["id"], a["content"])
        if had != a["content"]:  # the same token listed again (as added tokens are) is fine
            raise ModelFileError(f"{path}: added token {a['content']!r} has id {a['id']}, which is already "
                                 f"{had!r}; an id names one token")
        # HF strips the whitespace beside such a token when it matches; llama.cpp keeps it.
        strips = [side for side in ("lstrip", "rstrip") if a.get(side)]
        if strips:
            raise ModelFileError(f"{path}: added token {a['content']!r} has {' and '.join(strips)} set, which "
                                 "llama.cpp does not honour (it would keep the whitespace HF removes)")


def _merges(path: Path, raw: Any) -> list[str]:
    """BPE merges as llama.cpp stores them, "left right"; tokenizer.json has that form or [left, right] pairs."""
    if not isinstance(raw, list):
        raise ModelFileError(f"{path}: model.merges must be a list")
    merges = []
    for i, m in enumerate(raw):
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            m = " ".join(m)
        if not isinstance(m, str) or m.count(" ") != 1:
            raise ModelFileError(f"{path}: model.merges[{i}] is {m!r:.40}, expected \"left right\" or [left, right]")
        merges.append(m)
    return merges


def _template_adds(post: dict[str, Any] | None) -> tuple[bool, bool]:
    """Whether the HF post-processor puts a special token before / after a single sequence."""
    if post is None:
        return False, False
    post = _object(post, "post_processor")
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    if not isinstance(steps, list):
        raise ModelFileError(f"post_processor.processors must be a list, got {json.dumps(steps)[:40]}")
    for i, step in enumerate(steps):
        s = _object(step, f"post_processor.processors[{i}]")
        if s.get("type") == "TemplateProcessing":
            single = s.get("single") or []
            if not (isinstance(single, list) and all(isinstance(piece, dict) for piece in single)):
                raise ModelFileError(f"post_processor single must be a list of objects, got {json.dumps(single)[:40]}")
            return bool(single and "SpecialToken" in single[0]), bool(single and "SpecialToken" in single[-1])
    return False, False


def _named(path: Path, value: Any, field: str) -> dict[str, Any]:
    with _naming(path):
        return _object(value, field)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Errors about a part of tokenizer.json, told of the file."""
    try:
        yield
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


# -- GGUF -> transformers ----------------------------------------------------------------------------------
def build_hf_tokenizer(kv: dict[str, Any], out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ chat template) for a GGUF's BPE vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model = kv.get("tokenizer.ggml.model")
    # A GGUF without a pre-tokenizer (older files) gets llama.cpp's default split, and says so once converted back.
    pre = kv.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ModelFileError(f"cannot import tokenizer model {model!r} (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ModelFileError(f"cannot import pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = kv["tokenizer.ggml.tokens"]
    types: list[int] = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [m.split(" ", 1) for m in kv.get("tokenizer.ggml.merges") or []]
    # The special tokens llama.cpp adds around a text (add_bos_token / add_eos_token), by kind.
    adds = {kind: tid for kind in ("bos", "eos")
            if kv.get(f"tokenizer.ggml.add_{kind}_token", False)
            and isinstance(tid := kv.get(f"tokenizer.ggml.{kind}_token_id"), int) and 0 <= tid < len(tokens)}
    # Written as tokenizer.json's own schema: the `tokenizers` builder API cannot set every field we need.
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": types[i] == gguf.TokenType.CONTROL}
            for i in range(len(tokens)) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
        ],
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": _post_processor(adds, tokens),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == IGNORES_MERGES,
                  # Rows past the tokenizer (UNUSED padding to a round size) stay out of it, as they were before
                  # conversion: converting back makes them padding again, not normal tokens.
                  "vocab": {t: i for i, t in enumerate(tokens) if types[i] != gguf.TokenType.UNUSED},
                  "merges": merges},
    }
    tok = Tokenizer.from_str(json.dumps(spec))

    def text(key: str) -> str | None:
        tid = kv.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=text("bos"), eos_token=text("eos"), unk_token=text("unknown"),
        pad_token=text("padding"), add_bos_token="bos" in adds, add_eos_token="eos" in adds,
        clean_up_tokenization_spaces=False,
    )
    template = kv.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))


def _post_processor(adds: dict[str, int], tokens: list[str]) -> dict[str, Any]:
    """tokenizer.json's post-processor for the special tokens llama.cpp adds (transformers rebuilds the same from
    add_bos_token / add_eos_token; other readers of tokenizer.json use this)."""
    if not adds:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

    def one(seq: str, type_id: int) -> list[dict[str, Any]]:
        around = {kind: [{"SpecialToken": {"id": tokens[tid], "type_id": type_id}}] for kind, tid in adds.items()}
        return [*around.get("bos", []), {"Sequence": {"id": seq, "type_id": type_id}}, *around.get("eos", [])]

    return {
        "type": "TemplateProcessing", "single": one("A", 0), "pair": one("A", 0) + one("B", 1),
        "special_tokens": {tokens[tid]: {"id": tokens[tid], "ids": [tid], "tokens": [tokens[tid]]}
                           for tid in adds.values()},
    }
