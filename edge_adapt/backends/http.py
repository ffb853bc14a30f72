"""A small JSON-over-HTTP client for OpenAI-compatible servers: bounded retries with backoff on 429, 5xx and
dropped connections (a server restarting, a queue full), one-line errors for everything else.

Standard library only (urllib), so the in-process runtime gains no dependency; one instance is shared by the
worker threads (each call opens its own connection). A call made under a `Cancel` stops when it is set: its
retry sleep wakes, and its connection is shut, so a request blocked on a slow or dead server returns at once.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edge_adapt.errors import EdgeAdaptError, UsageError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
KEY_ENV = "EDGE_ADAPT_BACKEND_KEY"  # the server's API key, read from the environment (only this one: a key meant
# for another service is never sent to whatever --backend names)


class RemoteError(EdgeAdaptError):
    """The server could not be used: unreachable past the retries, a refusal, or an answer of the wrong shape."""


class Stopped(RemoteError):
    """The call's Cancel was set (Ctrl-C, an error elsewhere, a caller that stopped early)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff doubling from `first_s` up to `max_s` (with jitter), or the server's Retry-After (at least
    `first_s`, at most `max_s`), for at most `give_up_s` from the call's start, the tries' own time included."""

    first_s: float = 0.25
    max_s: float = 8.0
    give_up_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after > 0:  # 0 or less ("now") is no reason to hammer the server
            return min(max(retry_after, self.first_s), self.max_s)
        return min(self.max_s, self.first_s * 2**attempt) * (0.5 + random.random() / 2)


@dataclass
class CallStats:
    """What the calls met: requests sent, retries (by cause) and time spent waiting to retry."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429s
    server_errors: int = 0  # 5xx
    dropped: int = 0  # connections refused or reset
    waited_s: float = 0.0


class Cancel:
    """Stops the calls made under it: `set()` wakes their retry sleeps and shuts their open connections."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def set(self) -> None:
        with self._lock:
            self._event.set()
            socks, self._socks = list(self._socks), set()
        for s in socks:
            _shut(s)

    def _add(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._event.is_set():
                self._socks.add(sock)
                return
        _shut(sock)
        raise Stopped("stopped")

    def _discard(self, socks: list[socket.socket]) -> None:
        with self._lock:
            self._socks.difference_update(socks)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already, or never connected
        pass


_calling = threading.local()  # the Cancel of the call this thread is making, and the sockets it opened


class _Tracked:
    """An http.client connection whose socket, once connected, is shut when the call's Cancel is set."""

    sock: socket.socket

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        cancel: Cancel | None = getattr(_calling, "cancel", None)
        if cancel is not None:
            _calling.socks.append(self.sock)
            cancel._add(self.sock)


class _HTTPConnection(_Tracked, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, http.client.HTTPSConnection):
    pass


_TRACKED: dict[type, type] = {http.client.HTTPConnection: _HTTPConnection, http.client.HTTPSConnection: _HTTPSConnection}


class _Tracking:
    def do_open(self, http_class: type, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_TRACKED.get(http_class, http_class), req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_Tracking, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_Tracking, urllib.request.HTTPSHandler):
    pass


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)  # the default handlers (proxies too), tracked


def check_url(url: str) -> str:
    """`url` stripped of a trailing slash, or a one-line UsageError: http(s), a host, a valid port, no user name
    or password (the key goes in a header), no query or fragment. The URL is echoed only when it holds no
    password."""
    shown = repr(url) if "@" not in url else "URL"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"backend {shown} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"backend {shown} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UsageError(f"the backend URL must not hold a user name or password: pass the API key in {KEY_ENV}")
    if not parts.hostname:
        raise UsageError(f"backend {url!r} names no host")
    if port == 0:
        raise UsageError(f"backend {url!r}: port 0 is not a port a server listens on")
    if parts.query or parts.fragment:
        raise UsageError(f"backend {url!r}: a base URL takes no query or fragment")
    return url.rstrip("/")


def key_fault(key: str) -> str | None:
    """Why `key` is not what this client sends, as it is, in 'Authorization: Bearer KEY' (None: it is). The
    client strips the key (check_key) and refuses what a header cannot carry, so `edge-adapt serve` refuses such
    a key at startup with these words: no client of this project could ever present it. The key itself is never
    part of the answer."""
    if not key:
        return "is empty"
    if key != key.strip():
        return "starts or ends with whitespace, which clients strip before sending it"
    if not all(33 <= ord(c) <= 126 for c in key):
        return ("holds a space, a control character or a non-ASCII character, which an HTTP Authorization header "
                "cannot carry")
    return None


def check_key(key: str | None) -> str | None:
    """The API key without surrounding whitespace (a trailing newline from a file), or a UsageError when it
    holds what an HTTP header cannot carry."""
    if key is None or not key.strip():
        return None
    key = key.strip()
    fault = key_fault(key)
    if fault is not None:
        raise UsageError(f"the backend API key ({KEY_ENV}) {fault}")
    return key


class JsonClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy = RetryPolicy(), clock: Callable[[], float] = time.monotonic,
                 versioned: bool = True) -> None:
        """`versioned`: paths are under the URL's /v1 (added when missing), as OpenAI's are."""
        url = check_url(base_url)
        self.base = url if url.endswith("/v1") or not versioned else url + "/v1"
        self.root = url.removesuffix("/v1")  # for a server's own routes (/health, llama-server's /lora-adapters)
        self.api_key = check_key(api_key)
        self.timeout_s, self.retry, self._clock = timeout_s, retry, clock
        self.stats = CallStats()

    def get(self, path: str, *, root: bool = False, cancel: Cancel | None = None) -> Any:
        return self._call("GET", (self.root if root else self.base) + path, None, cancel)

    def post(self, path: str, body: dict[str, Any], *, cancel: Cancel | None = None) -> Any:
        return self._call("POST", self.base + path, body, cancel)

    def _call(self, method: str, url: str, body: dict[str, Any] | None, cancel: Cancel | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        start = self._clock()
        deadline = start + self.retry.give_up_s
        attempt = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise Stopped("stopped")
            self.stats.requests += 1
            retry_after: float | None = None
            try:
                raw = self._once(method, url, data, headers, cancel)
                try:
                    return json.loads(raw)
                except ValueError:
                    if cancel is not None and cancel.is_set():
                        raise Stopped("stopped") from None
                    raise RemoteError(f"{url}: the answer is not JSON ({raw[:80]!r})") from None
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS:
                    raise RemoteError(f"{url}: {exc.code} {_message(exc)}{self._key_hint(exc.code)}") from None
                if exc.code == 429:
                    self.stats.throttled += 1
                else:
                    self.stats.server_errors += 1
                retry_after = _seconds(exc.headers.get("Retry-After"))
                why = f"{exc.code} {_message(exc)}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                    http.client.HTTPException) as exc:
                if cancel is not None and cancel.is_set():  # its connection was shut to stop it
                    raise Stopped("stopped") from None
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise RemoteError(f"{url}: no answer within {self.timeout_s:g} s (--backend-timeout)") from None
                # A refused certificate or a server that does not speak TLS (https:// to a plain-HTTP port) is
                # the same on every try: fail now, not after --backend-wait. An EOF mid-handshake is a dropped
                # connection (a server restarting) and is retried as one.
                if isinstance(reason, ssl.SSLError) and not isinstance(reason, (ssl.SSLEOFError,
                                                                                ssl.SSLZeroReturnError)):
                    raise RemoteError(f"{url}: the TLS connection failed ({_reason(reason)}): check the "
                                      "server's certificate, or use http:// for a server without TLS") from None
                self.stats.dropped += 1
                why = f"unreachable ({_reason(reason)})"
            delay = self.retry.delay(attempt, retry_after)
            now = self._clock()
            if now + delay > deadline:
                raise RemoteError(f"{url}: {why}, still after {attempt + 1} tries over {now - start:.0f} s")
            if cancel is not None:
                if cancel.wait(delay):
                    raise Stopped("stopped")
            else:
                time.sleep(delay)
            attempt += 1
            self.stats.retries += 1
            self.stats.waited_s += delay

    def _key_hint(self, status: int) -> str:
        """What to do about a 401: the key is this client's to set, and only from the environment."""
        if status != 401:
            return ""
        if self.api_key is None:
            return f" (no API key was sent: set {KEY_ENV} to the server's key)"
        return f" (the key sent, from {KEY_ENV}, is not the server's)"

    def _once(self, method: str, url: str, data: bytes | None, headers: dict[str, str],
              cancel: Cancel | None) -> bytes:
        """One request's body; its connection is shut if `cancel` is set meanwhile."""
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        _calling.cancel, _calling.socks = cancel, []
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                return resp.read()
        finally:
            if cancel is not None:
                cancel._discard(_calling.socks)
            _calling.cancel, _calling.socks = None, []


def _message(exc: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI's {"error": {"message": ...}}, or the body's first line."""
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        return exc.reason or ""
    try:
        err = json.loads(raw)
        msg = err.get("error", err) if isinstance(err, dict) else err
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        return " ".join(str(msg).split())[:300]
    except ValueError:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return (text[0] if text else str(exc.reason))[:300]


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (an HTTP date, or anything else, is left to the backoff)."""
    try:
        s = float(value) if value is not None else None
    except ValueError:
        return None
    return s if s is not None and math.isfinite(s) else None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
