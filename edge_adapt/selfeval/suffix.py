"""Rendering the self-evaluation suffix: a pure function of the config and the tokenizer.

The trained adapter (another issue) is trained on exactly these token ids, so any change here changes
what the adapter sees. Chat format, for a ChatML model and the default question:

    <|im_end|>\\n<|im_start|>user\\nWould you do better if you started over? ("Yes." or "No.")<|im_end|>\\n<|im_start|>assistant\\n

i.e. the assistant turn is ended, a user turn with the question is opened and closed, and the assistant
turn is opened: the text the model's own chat template puts between an assistant answer and the
generation prompt of the next turn. The response itself is never re-tokenized: the suffix tokens are
appended to the response's sampled tokens as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from edge_adapt.errors import ModelFileError, UsageError
from edge_adapt.selfeval.config import SelfEvalConfig

# Stand-ins for the conversation around the suffix; only the text after _RESPONSE is kept.
_PROMPT = "EDGEADAPTPROMPT"
_RESPONSE = "EDGEADAPTRESPONSE"


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, special: bool = True) -> list[int]: ...

    def chat_prompt(self, messages: list, *, add_generation_prompt: bool = True) -> str: ...


def suffix_text(config: SelfEvalConfig, tok: Tokenizer) -> str:
    """The suffix as text: verbatim for raw format, else what the chat template renders after an answer."""
    if config.format == "raw":
        assert config.suffix is not None
        return config.suffix
    rendered = tok.chat_prompt(
        [
            {"role": "user", "content": _PROMPT},
            {"role": "assistant", "content": _RESPONSE},
            {"role": "user", "content": config.question},
        ],
        add_generation_prompt=True,
    )
    at = rendered.rfind(_RESPONSE)
    if at < 0 or config.question not in rendered[at:]:
        raise ModelFileError("the model's chat template drops earlier assistant turns; use a raw self-eval suffix")
    return rendered[at + len(_RESPONSE) :]


def render_suffix(config: SelfEvalConfig, tok: Tokenizer) -> list[int]:
    """The suffix token ids decoded after a response (special tokens parsed, no BOS)."""
    ids = tok.tokenize(suffix_text(config, tok), special=True)
    if not ids:
        raise UsageError("the self-eval suffix renders to no tokens")
    return ids


def answer_token(tok: Tokenizer, text: str, which: str) -> int:
    """The single token id of an answer, or a one-line UsageError."""
    ids = tok.tokenize(text, special=True)
    if len(ids) != 1:
        raise UsageError(f"self-eval answer {which}={text!r} is {len(ids)} tokens {ids}; it must be exactly one token")
    return ids[0]


def split_for_adapter(suffix: Sequence[int], invocation: Sequence[int],
                      name: str = "the aLoRA") -> tuple[list[int], list[int]]:
    """(decoded with the adapter off, decoded with it on); `name` is the adapter as an error names it.

    A plain LoRA (no invocation tokens) is on for the whole suffix. An activated LoRA must see its
    invocation tokens as the first tokens it is on for: the suffix is split at their last occurrence.
    """
    suffix, invocation = list(suffix), list(invocation)
    if not invocation:
        return [], suffix
    n = len(invocation)
    for at in range(len(suffix) - n, -1, -1):
        if suffix[at : at + n] == invocation:
            return suffix[:at], suffix[at:]
    raise UsageError(
        f"{name}'s invocation tokens {invocation} do not occur in the self-eval suffix {suffix}; "
        "convert the adapter again with a --self-eval-config whose suffix contains them, or score with a self-eval "
        "config whose suffix does"
    )
