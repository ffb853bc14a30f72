"""Where a text full of special tokens can be cut so that llama.cpp tokenizes it in pieces, token for token as
it would whole, in linear time.

llama.cpp splits a text at special-token texts (`<|im_end|>`, user-defined tokens) before it tokenizes the
rest, and that split walks a linked list from its head at every match: a text with n special tokens costs n^2
(40,000 `<|im_end|>` took 3.1 s here, a 4 MiB HTTP body several minutes). Tokenized in pieces of a few hundred
special tokens each, it costs n. A piece boundary must be one llama.cpp's own split has there: the end of a
special-token match that nothing else could have claimed.

llama.cpp's split (llama-vocab.cpp, tokenizer_st_partition) takes the special tokens longest first; for each, it
cuts every raw-text fragment at the token's leftmost non-overlapping occurrences, stripping whitespace next to
a token marked lstrip / rstrip. An occurrence [a, c) of a token T is certainly one of its matches, and c a
boundary between fragments, when
- no other occurrence of a token as long as T or longer overlaps [a, c) (nothing else can take its bytes; an
  occurrence of a shorter token inside it is taken by T first, since T comes earlier);
- no occurrence of any token crosses c;
- T neither starts nor ends with whitespace and is not rstrip (no whitespace stripping reaches across c).
Tokenizing up to c and from c on then gives what tokenizing the whole gives.
"""

from __future__ import annotations

from dataclasses import dataclass

WHITESPACE = b" \t\n\v\f\r"  # C's isspace, which llama.cpp's stripping uses


@dataclass(frozen=True)
class Special:
    text: bytes
    rstrip: bool

    @property
    def cuttable(self) -> bool:
        """Whether a piece may end right after this token (the last condition above)."""
        return not self.rstrip and self.text[:1] not in WHITESPACE and self.text[-1:] not in WHITESPACE


def occurrences(data: bytes, specials: list[Special]) -> list[tuple[int, int, Special]]:
    """Every occurrence of every special token's text, overlapping ones too, as (start, end, token) sorted by
    start, the longer first at one start."""
    found = []
    for sp in specials:
        at = data.find(sp.text)
        while at >= 0:
            found.append((at, at + len(sp.text), sp))
            at = data.find(sp.text, at + 1)
    found.sort(key=lambda o: (o[0], -o[1]))
    return found


def safe_cuts(data: bytes, specials: list[Special], every: int) -> list[int]:
    """Byte offsets at which `data` can be cut (see the module's note), about `every` occurrences apart."""
    found = occurrences(data, [sp for sp in specials if sp.text])
    cuts: list[int] = []
    reach = 0  # the furthest end of the occurrences before the one looked at
    since = 0
    for i, (a, c, sp) in enumerate(found):
        since += 1
        if since >= every and sp.cuttable and reach <= a and _alone(found, i):
            cuts.append(c)
            since = 0
        reach = max(reach, c)
    return cuts


def _alone(found: list[tuple[int, int, Special]], i: int) -> bool:
    """Whether the occurrences after found[i] that start inside it lie inside it and are shorter (those before
    it are checked by the caller: they must end by its start)."""
    a, c, _ = found[i]
    for start, end, _ in found[i + 1 :]:
        if start >= c:
            return True
        if end > c or end - start >= c - a:
            return False
    return True
