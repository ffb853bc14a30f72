"""Turning token bytes into streamed text: never split a UTF-8 character, find stop strings across tokens."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class TextStream:
    """Accumulates a sample's bytes and releases text that is safe to show.

    Text is held back while it could still be the start of a stop string or of a multi-byte character;
    `push` returns the newly releasable text and whether a stop string ended the sample.
    """

    stop: tuple[str, ...] = ()
    text: str = ""  # everything released so far, final once stopped
    _pending: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def push(self, data: bytes) -> tuple[str, bool]:
        if not self.stop:  # nothing to hold back but a partial character, which the decoder keeps itself
            out = self._pending + self._decoder.decode(data)
            self._pending = ""
            self.text += out
            return out, False
        self._pending += self._decoder.decode(data)
        for s in self.stop:
            at = self._pending.find(s)
            if at >= 0:
                out = self._pending[:at]
                self._pending = ""
                self.text += out
                return out, True
        hold = self._held_back()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        self.text += out
        return out, False

    def copy(self) -> TextStream:
        """An independent stream in the same state (held-back text and a partial character included)."""
        twin = TextStream(self.stop, self.text, self._pending)
        twin._decoder.setstate(self._decoder.getstate())
        return twin

    def flush(self) -> str:
        """End of sample: release whatever was held back (an incomplete character becomes U+FFFD)."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of pending text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if s.startswith(self._pending[-n:]):
                    best = n
                    break
        return best


def tokens_within(pieces: Iterable[bytes], text: str) -> int:
    """How many leading tokens (their `pieces`) begin inside a sample's shown `text`: those that hold any of it.
    The token the stop string that ended it begins inside is one of them when it also holds shown text (a
    `".\n"` before a stop string `"\nUser:"`): judging the reply without its end would be worse than with a
    character of the stop string."""
    shown = len(text.encode("utf-8"))
    n = at = 0
    for piece in pieces:
        if at >= shown:
            break
        at += len(piece)
        n += 1
    return n
