"""The gate in front of the app (plain ASGI, so nothing is parsed before it has run): who may ask (the Host a
loopback server answers to, the browser origins it serves), the API key, then the body size limit. A refused
request's body is read and dropped, never held, so the client gets the answer instead of a broken pipe while it
is still sending."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from edge_adapt.server.openai_errors import APIError, shutting_down

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 4 << 20  # bytes: a chat of about a million tokens, far beyond any context this server holds
DRAIN_LIMIT = 256 << 20  # past this much refused body the connection is simply closed
OPEN_PATHS = ("/health", "/v1/models")  # answer without the key, as OpenAI's model list does for a client


def _open(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)


def is_loopback_name(host: str) -> bool:
    """Whether a Host header (name or address, with or without a port) names this machine's loopback."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    name = name.lower().rstrip(".")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost" or name.endswith(".localhost")  # browsers resolve these to loopback themselves


async def before_stop(work: Awaitable[T], stopping: asyncio.Event | None) -> T | None:
    """`work`'s result, or None if the server starts stopping first; `work` is cancelled then (a call running
    on a thread runs on to its end, and its result is dropped)."""
    if stopping is None:
        return await work
    task = asyncio.ensure_future(work)
    if stopping.is_set():
        task.cancel()
        return None
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


def origin_refused(origin: str) -> APIError:
    return APIError(403, f"requests from the web page origin {origin!r} are refused; start the server with "
                         f"--cors-origin {origin} to allow it", code="origin_not_allowed")


class CORS(CORSMiddleware):
    """Starlette's CORS middleware, whose refusal of a preflight is in OpenAI's error shape: a 403 for an origin
    the server does not serve, as Guard answers that origin's other requests (Starlette's is a plain-text 400)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin=origin):
            return origin_refused(origin).response()
        return APIError(400, f"the preflight asks for what this server does not allow ({bytes(response.body).decode()})",
                        code="cors_not_allowed").response()


class Guard:
    """`origins`: the browser origins served ("*": any); a request from any other page is refused, since a
    browser sends a page's plain POSTs without asking first. `loopback_only`: answer only to loopback Host
    names, so a page whose name is re-pointed at 127.0.0.1 (DNS rebinding) gets nothing from a local server."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int = MAX_BODY, origins: tuple[str, ...] = (),
                 loopback_only: bool = False, stopping: asyncio.Event | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body
        self.origins = origins
        self.loopback_only = loopback_only
        # Set when the server stops: a client still sending its body is answered 503 at once, instead of being
        # waited for and then cancelled with a traceback in the log.
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        # A client that waits for "100 Continue" before sending its body gets a refusal instead, and sends nothing.
        sending = headers.get("expect", "").lower() != "100-continue"
        if self.loopback_only and not is_loopback_name(headers.get("host", "localhost")):
            await self._refuse(receive, send, APIError(
                403, f"this server answers only to localhost, not to the host name {headers['host']!r}",
                code="host_not_allowed"), more=sending)
            return
        origin = headers.get("origin")
        if origin is not None and "*" not in self.origins and origin not in self.origins:
            await self._refuse(receive, send, origin_refused(origin), more=sending)
            return
        if self.api_key is not None and scope["method"] != "OPTIONS" and not _open(scope["path"]):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                what = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
                await self._refuse(receive, send, APIError(401, what, code="invalid_api_key"), more=sending)
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(receive, send, self._too_large(), more=sending)
            return
        body, more = bytearray(), True
        while more:
            message = await self._next(receive)
            if message is None:
                await shutting_down().response()({"type": "http"}, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._refuse(receive, send, self._too_large(), more=more)
                return
        replayed = False

        async def replay() -> Message:
            # The body once, whole; then the client's own messages (the disconnect a handler waits on).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server takes ({self.max_body >> 20} MiB)",
                        code="request_too_large")

    async def _refuse(self, receive: Receive, send: Send, error: APIError, *, more: bool = True) -> None:
        """Read what is left of the body (dropping it), then answer `error`."""
        seen = 0
        while more and seen <= DRAIN_LIMIT:
            message = await self._next(receive)
            if message is None:
                break
            if message["type"] == "http.disconnect":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        await error.response()({"type": "http"}, receive, send)

    async def _next(self, receive: Receive) -> Message | None:
        """The client's next message, or None once the server is stopping."""
        return await before_stop(receive(), self.stopping)
