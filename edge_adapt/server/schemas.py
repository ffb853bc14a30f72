"""Request bodies of the OpenAI endpoints, checked at the HTTP edge.

Strict: a field of the wrong JSON type is refused rather than coerced ("8" is not a number), an unknown field
is refused by name, and a field OpenAI defines but this server does not implement (tools, response_format,
penalties other than 0, ...) is refused by name too, never silently ignored. Sampling ranges are the library's
own (edge_adapt.engine.sampling.SAMPLING_RULES), checked when the job is built.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

MAX_STOP = 4  # as OpenAI: up to 4 stop strings
MAX_LOGIT_BIAS = 300  # as OpenAI: up to 300 biased tokens, each by -100..100
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI: 0..20)
MAX_COMPLETION_LOGPROBS = 20  # completions' logprobs (OpenAI caps it at 5; vLLM at its max_logprobs, 20 by default)

# Fields OpenAI defines that this server does not implement: refused unless given their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "store": (None, False),
    "metadata": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "web_search_options": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class FieldError(ValueError):
    """A refusal that names its field even where pydantic cannot (checks across fields)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _utf8(text: str, what: str) -> str:
    """JSON can spell lone surrogates (\\ud800) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text (a lone surrogate)") from None
    return text


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """null for an optional field means its default, as OpenAI reads it (clients send "n": null, "stream":
        null); a required field keeps its null, to be refused by name."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(_Body):
    include_usage: bool = False


class EdgeAdaptOptions(_Body):
    """The `edge_adapt` extension object (`extra_body={"edge_adapt": {...}}` with the SDK): a self-evaluation
    strategy for this request, with the names and checks of `edge-adapt run` (`keep` is its --keep)."""

    strategy: str
    budget: int | None = None
    threshold: float | None = None
    keep: int | None = None
    prune_at: int | list[int] | None = None
    policy: dict[str, Any] | None = None
    beam_width: int | None = None
    max_step_tokens: int | None = None
    lookahead: int | None = None
    sequential_ratio: float | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _inline_policy(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            raise ValueError("policy must be the policy itself, an inline JSON object (the server reads no files)")
        return v


class _Completion(_Body):
    """The fields chat completions and completions share."""

    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1 or absent: a random seed")
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    edge_adapt: EdgeAdaptOptions | None = None
    # vLLM's extension, on both endpoints as there: logprobs name each token as "token_id:<id>" instead of its
    # text, so a client gets the exact token ids of the reply (what a label file records and a self-eval request
    # sends back).
    return_tokens_as_token_ids: bool = False
    # Declared only to be refused by name (see _NEUTRAL); Any so that the refusal, not a type error, speaks.
    logit_bias: Any = Field(None, validate_default=True)
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v: Any) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} with biases in -100..100, as (id, bias) pairs."""
        if v is None:
            return ()
        if not isinstance(v, dict):
            raise ValueError("must be an object mapping token ids to biases")
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"takes at most {MAX_LOGIT_BIAS} tokens, got {len(v)}")
        out = []
        for key, bias in v.items():
            # A token id (llama_token, an int32) has at most 10 digits; a longer key is no id (and int() of one
            # past 4300 digits would raise with Python's own advice).
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"key {key[:20]!r} is not a token id")
            if type(bias) not in (int, float) or not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be a number in -100..100")
            out.append((int(key), float(bias)))
        return tuple(out)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP:
            raise ValueError(f"takes at most {MAX_STOP} stop strings, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("a stop string must not be empty (it would end every reply at once)")
        return tuple(_utf8(s, "a stop string") for s in items)

    @model_validator(mode="after")
    def _token_ids(self) -> _Completion:
        if self.return_tokens_as_token_ids and self.top_alternatives is None:  # type: ignore[attr-defined]
            raise FieldError("return_tokens_as_token_ids", "return_tokens_as_token_ids needs logprobs")
        return self

    @model_validator(mode="after")
    def _unsupported(self) -> _Completion:
        for name in type(self).model_fields:
            if name in _NEUTRAL and getattr(self, name) not in _NEUTRAL[name]:
                raise FieldError(name, f"{name} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return self.stop  # type: ignore[no-any-return]  # the validator made it a tuple


class ContentPart(_Body):
    type: Literal["text"]
    text: str


# The parts are validated as one list so that a refusal names its part (messages.0.content.1.text): the errors of
# a validation run inside a field validator are placed under the field, and one part validated alone has no index.
_CONTENT_PARTS = TypeAdapter(list[ContentPart])


class ChatMessage(_Body):
    role: str
    content: Any
    name: str | None = None  # accepted as OpenAI does; the chat template has no place for it

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v == "developer":  # OpenAI's newer name for the system role
            return "system"
        if v not in ("system", "user", "assistant"):
            raise ValueError(f"role {v!r} is not supported (system, user, assistant or developer)")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        """A string, or a list of text parts joined; anything else (images, audio, null) is refused."""
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts are supported, got {kind!r}")
            v = "".join(part.text for part in _CONTENT_PARTS.validate_python(v))
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return _utf8(v, "the content")  # "" too, as OpenAI: an empty system turn, an empty reply sent back


class ChatCompletionRequest(_Completion):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None

    @model_validator(mode="after")
    def _limits(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise FieldError("max_completion_tokens", "max_tokens and max_completion_tokens disagree (give one)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """None: no logprobs; k: logprobs with the k most likely alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Completion):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        """One prompt: a string or a list of token ids (or a list holding one of them); batches are refused."""
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if all(isinstance(t, (str, list)) for t in v):
                raise ValueError("only one prompt per request is supported (a string, a list of token ids, "
                                 "or a list holding one of them)")
            bad = next((i for i, t in enumerate(v) if type(t) is not int), None)
            if bad is not None:
                raise ValueError(f"token ids must be integers (item {bad} is {json.dumps(v[bad])[:40]})")
            if min(v) < 0:
                raise ValueError("token ids must not be negative")
            return list(v)
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of token ids")
        if not v:
            raise ValueError("must not be empty")
        return _utf8(v, "the prompt")

    @property
    def token_limit(self) -> int | None:
        # OpenAI's completions default is 16 tokens; an absent max_tokens here means that too.
        return self.max_tokens if self.max_tokens is not None else 16

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs
