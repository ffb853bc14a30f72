"""A small JSON-over-HTTP client for OpenAI-compatible servers: bounded retries with backoff on 429, 5xx and
dropped connections (a server restarting, a queue full), one-line errors for everything else.

Standard library only (urllib), so the in-process runtime gains no dependency; one instance is shared by the
worker threads (each call opens its own connection).
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_adapt.errors import EdgeAdaptError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RemoteError(EdgeAdaptError):
    """The server could not be used: unreachable past the retries, a refusal, or an answer of the wrong shape."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff doubling from `first_s` up to `max_s` (with jitter, or the server's Retry-After), for at most
    `give_up_s` of waiting in one call."""

    first_s: float = 0.25
    max_s: float = 8.0
    give_up_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_s)
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


class JsonClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
                 versioned: bool = True) -> None:
        """`versioned`: paths are under the URL's /v1 (added when missing), as OpenAI's are."""
        url = base_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"backend {base_url!r} is not an http:// or https:// URL")
        self.base = url if url.endswith("/v1") or not versioned else url + "/v1"
        self.api_key, self.timeout_s, self.retry, self._sleep = api_key, timeout_s, retry, sleep
        self.stats = CallStats()

    def get(self, path: str, *, give_up_s: float | None = None) -> Any:
        return self._call("GET", path, None, give_up_s)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body, None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None, give_up_s: float | None) -> Any:
        url = self.base + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        limit = self.retry.give_up_s if give_up_s is None else give_up_s
        waited, attempt = 0.0, 0
        while True:
            self.stats.requests += 1
            retry_after: float | None = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise RemoteError(f"{url}: the answer is not JSON ({raw[:80]!r})") from None
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS:
                    raise RemoteError(f"{url}: {exc.code} {_message(exc)}") from None
                if exc.code == 429:
                    self.stats.throttled += 1
                else:
                    self.stats.server_errors += 1
                retry_after = _seconds(exc.headers.get("Retry-After"))
                why = f"{exc.code} {_message(exc)}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise RemoteError(f"{url}: no answer within {self.timeout_s:.0f} s") from None
                self.stats.dropped += 1
                why = f"unreachable ({_reason(reason)})"
            delay = self.retry.delay(attempt, retry_after)
            if waited + delay > limit:
                raise RemoteError(f"{url}: {why}, still after {attempt + 1} tries over {waited:.0f} s")
            self._sleep(delay)
            waited += delay
            attempt += 1
            self.stats.retries += 1
            self.stats.waited_s += delay


def _message(exc: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI's {"error": {"message": ...}}, or the body's first line."""
    try:
        raw = exc.read()
    except OSError:
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
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
