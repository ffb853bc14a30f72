"""Errors in OpenAI's body shape: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the
official SDKs map to their exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, ...). Every error the server answers goes through `APIError`, FastAPI's own errors included."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from edge_adapt.errors import BudgetError, ContextOverflowError, EdgeAdaptError, UsageError
from edge_adapt.server.scheduler import ShuttingDown

def json_bytes(content: Any) -> bytes:
    """`content` as a JSON body in UTF-8, as Starlette writes one, whatever its strings hold. JSON can spell a lone
    surrogate ("\\ud800"), which a request may carry into a string the server quotes back (a model name, a
    policy's option), and a file name's undecodable bytes become one too; UTF-8 has no encoding for it, so such a
    body is written with ASCII escapes instead, which spell the same strings."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class JSONBody(JSONResponse):
    """Every JSON response of the server, errors and answers: one `json_bytes` rendering."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


# The `type` OpenAI gives each status (401 is an invalid request there too).
_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "unavailable_error",
}


class APIError(Exception):
    """An answer other than 200, as OpenAI shapes it."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONBody(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")


def from_library(exc: EdgeAdaptError) -> APIError:
    """The library's refusal of a request (bad settings, too many samples, a prompt over the context) as a 400."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="exceed_context_size_error")
    if isinstance(exc, BudgetError):
        return APIError(400, str(exc), code="budget_exceeded")
    if isinstance(exc, ShuttingDown):  # not the request's fault
        return APIError(503, str(exc), code="unavailable")
    if isinstance(exc, (UsageError, BudgetError)):
        return APIError(400, str(exc))
    return APIError(500, str(exc), code="internal_error")  # an engine failure is the server's, not the request's


def lone_surrogate(data: Any, where: str | None = None) -> APIError:
    """A 400 for a request the library could not even refuse: a validator whose message quotes a string holding a
    lone surrogate makes pydantic raise UnicodeEncodeError. Named by the first key or string that holds one
    (`where`: the field `data` is)."""
    root = [where] if where else []
    path, what = _surrogate_at(data, root) or (root, "a string")
    param = ".".join(path) or None
    return bad_request(f"{param + ': ' if param else ''}{what} is not valid UTF-8 text (a lone surrogate)", param)


def _surrogate_at(data: Any, root: list[str]) -> tuple[list[str], str] | None:
    todo: list[tuple[list[str], Any]] = [(root, data)]
    while todo:  # no recursion: a body may nest as deep as json.loads goes
        path, value = todo.pop()
        if isinstance(value, str):
            if not _encodes(value):
                return path, "a string"
        elif isinstance(value, dict):
            if not all(_encodes(str(k)) for k in value):
                return path, "a key"
            todo += [([*path, str(k)], v) for k, v in reversed(value.items())]
        elif isinstance(value, (list, tuple)):
            todo += [([*path, str(i)], v) for i, v in reversed(list(enumerate(value)))]
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def from_pydantic(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first of pydantic's errors, named by its field path as OpenAI names `param` (`messages.0.role`)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if err.get("type") == "string_unicode":  # a key holding a lone surrogate: pydantic says only "unable to parse"
        where = f"{param}: " if param else ""
        return bad_request(f"{where}a key is not valid UTF-8 text (a lone surrogate)", param)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    named = getattr((err.get("ctx") or {}).get("error"), "param", None)  # schemas.FieldError: says it all
    if named is not None:
        return bad_request(msg, named, "unsupported_parameter" if "not supported" in msg else None)
    return bad_request(f"{param}: {msg}" if param else msg, param)


async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (unknown path) and 405 (wrong method) in OpenAI's shape."""
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: "Unknown request URL", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=dict(exc.headers or {})).response()


async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's RequestValidationError (a 422 by default) as a 400."""
    return from_pydantic(list(getattr(exc, "errors", lambda: [{}])())).response()


async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
