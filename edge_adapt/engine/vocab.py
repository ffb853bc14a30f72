"""A model's text side, shared by the Engine and by `Vocab`: tokenizing, detokenizing, the chat template.

`Vocab` loads only the vocabulary (llama.cpp `vocab_only`), not the weights: enough to count a prompt's and a
self-evaluation suffix's tokens, and so to size an engine exactly before loading it (edge_adapt.sizing).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from edge_adapt.engine.chat import Message, content_spans, render_chat
from edge_adapt.engine.gguf_file import GGUFInfo, inspect_gguf
from edge_adapt.engine.handles import Model, free_when_collected, init_backend
from edge_adapt.errors import ContextOverflowError, UsageError, is_whole


def fingerprint(info: GGUFInfo) -> str:
    """What identifies a model for snapshots, pools, label files and policies: its shape, and a digest of its
    bytes (a fine-tune of the same shape and quantization is another model)."""
    return f"{info.architecture}:{info.n_params}:{info.n_vocab}:{info.file_type}:{info.digest}"


def same_model(a: str, b: str) -> bool:
    """Whether two fingerprints (this model's, one recorded in a file) name the same model. Samples a server drew
    are recorded as `remote:NAME|tokenizer=FP` (edge_adapt.backends.remote): FP is the GGUF that rendered and
    checked them, the one to train and run with. One written before fingerprints held a digest names the shape
    only, and is taken for any model of that shape, as it was then."""
    a, b = (x.rsplit("|tokenizer=", 1)[1] if x.startswith("remote:") and "|tokenizer=" in x else x for x in (a, b))
    return a == b or any(x.count(":") == 3 and y.startswith(x + ":") for x, y in ((a, b), (b, a)))


def first_bad_token(tokens: Seq[object], n_vocab: int) -> int | None:
    """Where the first entry of `tokens` that is not a token id of a vocabulary of `n_vocab` is (None if all are):
    llama.cpp aborts the process on an id past its vocabulary when turning it into text, and fails a decode of one
    without saying which."""
    return next((i for i, t in enumerate(tokens) if not is_whole(t) or not 0 <= t < n_vocab), None)  # type: ignore


class TextModel:
    """Text methods over `self.model` (a loaded Model handle) and `self.info` (its GGUF metadata)."""

    model: Model
    info: GGUFInfo
    model_path: Path

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False, most: int | None = None) -> list[int]:
        """`most`: a text of more tokens is refused (ContextOverflowError), a long one before all of it is read."""
        return self.model.tokenize(text, add_special=add_bos, parse_special=special, most=most)

    def detokenize(self, tokens: Seq[int]) -> str:
        # Checked here, not in Model.piece, which the decode loop calls with ids the model itself sampled.
        if not isinstance(tokens, (list, tuple, range, np.ndarray)):  # bytes, which iterate as small ints, too
            raise UsageError(f"detokenize takes a list of token ids, got {type(tokens).__name__}")
        n_vocab = self.model.n_vocab
        bad = first_bad_token(tokens, n_vocab)
        if bad is not None:
            raise UsageError(f"{tokens[bad]!r:.40} is not a token id of this model's vocabulary (0 to {n_vocab - 1})")
        return b"".join(self.model.piece(int(t)) for t in tokens).decode("utf-8", "replace")  # numpy ints too

    def chat_prompt(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        return render_chat(
            self.model.chat_template() or self.info.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.detokenize([self.model.bos]) if self.model.bos >= 0 else "",
            eos_token=self.detokenize([self.model.eos]) if self.model.eos >= 0 else "",
        )

    def chat_tokens(self, messages: list[Message], *, text: str | None = None, start: int = 0,
                    most: int | None = None) -> list[int]:
        """The conversation's tokens (`text`: its chat_prompt, where the caller has it), from character `start` on.
        A message's content is text: control-token text in it (`<|im_end|>` typed by a user or found in a
        document) is tokenized as plain characters, so a message cannot end its turn or open another role's.
        `most` as for tokenize."""
        if text is None:
            text = self.chat_prompt(messages)
        controls = self.model.control_texts
        held = [i for i, m in enumerate(messages) if any(c in m["content"] for c in controls)]
        if not held:  # the common case, tokenized whole as before
            return self.tokenize(text[start:], most=most)
        spans = content_spans(self.chat_prompt, messages, text)
        if spans is None:
            found = next(c for c in controls if c in messages[held[0]]["content"])
            raise UsageError(f"message {held[0] + 1} holds a control token's text ({found}), and this model's chat "
                             "template rewrites message contents, so it cannot be kept as plain text: remove it")
        cuts = sorted({start, len(text), *(x for span in spans for x in span if x > start)})
        tokens: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            plain = any(s <= a and b <= e for s, e in spans)
            try:
                tokens += self.tokenize(text[a:b], special=not plain, most=None if most is None else most - len(tokens))
            except ContextOverflowError:
                raise ContextOverflowError(f"the text is longer than {most} tokens") from None
        return tokens

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.info)


class Vocab(TextModel):
    """The tokenizer and chat template of a GGUF model, without its weights. Close it (or use `with`)."""

    def __init__(self, model: str | Path | None = None) -> None:
        if model is None:
            from edge_adapt.engine.default_model import default_model_path

            model = default_model_path()
        self.model_path = Path(model)
        self.info = inspect_gguf(self.model_path)
        init_backend()
        self.model = Model(self.model_path, vocab_only=True)
        free_when_collected(self, self.model)

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Vocab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
