"""Chat prompts rendered with the model's own template (tokenizer.chat_template) in a jinja2 sandbox."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, TypedDict

from edge_adapt.errors import ModelFileError, UsageError


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


# Used when a GGUF carries no template: ChatML, which SmolLM2, Qwen2 and many small models speak.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UsageError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ModelFileError(f"the model's chat template does not compile: {exc}") from None


def render_chat(
    template: str | None,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    if not isinstance(messages, (list, tuple)):
        raise UsageError(f"chat messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UsageError(f"bad chat message {m!r}: needs role system/user/assistant and string content")
        try:  # here, where the position is the message's own: tokenizing finds it in the rendered prompt
            m["content"].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8, decoded with surrogateescape
            raise UsageError(f"message {i + 1} is not valid Unicode ({exc.object[exc.start:exc.end]!r} at character "
                             f"{exc.start})") from None
    from jinja2 import TemplateError

    try:
        return _compile(template or CHATML).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as exc:
        raise ModelFileError(f"the model's chat template failed to render: {exc}") from None


# A message's content stand-in: private-use characters, which no template writes and no filter (trim) removes.
_MARK = "\ue000{}\ue001"
_MARKED = re.compile("\ue000(\\d+)\ue001")


def content_spans(render: Callable[[list[Message]], str], messages: list[Message],
                  text: str) -> list[tuple[int, int]] | None:
    """Where the messages' contents lie in `text`, the conversation as `render` writes it: found by rendering it
    again with a marker in place of each content, and checked by putting the contents back. None where the
    template does more with a content than write it out (strips it, splits it at a tag)."""
    parts = _MARKED.split(render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]))
    spans: list[tuple[int, int]] = []
    at = 0
    for i, part in enumerate(parts):
        if i % 2:  # split() puts each marker's group at the odd places
            parts[i] = part = messages[int(part)]["content"]
            spans.append((at, at + len(part)))
        at += len(part)
    return spans if "".join(parts) == text else None
