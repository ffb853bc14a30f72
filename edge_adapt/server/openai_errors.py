"""Errors in OpenAI's body shape: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the
official SDKs map to their exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, ...). Every error the server answers goes through `APIError`, FastAPI's own errors included."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from edge_adapt.errors import BudgetError, ContextOverflowError, EdgeAdaptError, UsageError
from edge_adapt.server.scheduler import ShuttingDown

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
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def from_pydantic(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first of pydantic's errors, named by its field path as OpenAI names `param` (`messages.0.role`)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
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
