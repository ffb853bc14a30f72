"""Greedy accuracy of a model per family and level: how the levels were tuned (docs/tasks.md).

    python -m edge_adapt.tasks.measure wordprob compare --prompts 24 --split validation --threads 2

prints one markdown row per (family, level): prompts, greedy accuracy, mean reply tokens and the share of replies
cut at max_tokens. Calibrate on validation or train, never on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_adapt.tasks.base import SPLITS
from edge_adapt.tasks.family import Family


@dataclass(frozen=True)
class LevelRow:
    family: str
    level: int
    prompts: int
    right: int
    mean_tokens: float
    cut: float  # share of replies that hit max_tokens

    @property
    def accuracy(self) -> float:
        return self.right / self.prompts

    def markdown(self) -> str:
        return (f"| {self.family} | {self.level} | {self.prompts} | {self.accuracy:.2f} ({self.right}/{self.prompts}) "
                f"| {self.mean_tokens:.0f} | {self.cut:.2f} |")


HEADER = ("| family | level | prompts | greedy accuracy | mean reply tokens | cut at max_tokens |\n"
          "| --- | --- | --- | --- | --- | --- |")


def measure(families: Sequence[Family], n: int = 24, split: str = "validation", max_tokens: int | None = None,
            threads: int | None = None, model: Path | None = None, dump: Path | None = None,
            batch: int = 8) -> Iterator[LevelRow]:
    """Greedy replies to the first `n` problems of each level of each family, several prompts decoded together."""
    from edge_adapt.engine import GREEDY, Engine

    longest = max(f.max_tokens if max_tokens is None else max_tokens for f in families)
    with Engine(model=model, parallel=2 * batch, ctx=512 + longest, threads=threads) as e:
        for fam in families:
            mt = fam.max_tokens if max_tokens is None else max_tokens
            for level in fam.levels:
                probs = fam.problems(level, split, n)
                right = tokens = cut = 0
                for lo in range(0, n, batch):
                    group = probs[lo : lo + batch]
                    roots = [e.open(e.chat_tokens(list(p.messages))) for p in group]
                    samples = [e.start(r, [GREEDY], max_tokens=mt, first_index=i)[0] for i, r in enumerate(roots)]
                    for _ in e.advance(samples):
                        pass
                    for s, p in zip(samples, group):
                        ok = (p.scorer or fam.scorer).correct(s.text, p.answer)
                        right += ok
                        tokens += len(s.generated)
                        cut += s.finish == "length"
                        if dump:
                            with open(dump, "a", encoding="utf-8") as fh:
                                fh.write(json.dumps({"id": p.id, "answer": p.answer, "text": s.text, "correct": ok,
                                                     "tokens": len(s.generated)}) + "\n")
                    for s in samples:
                        e.release(s.seq)
                    for r in roots:
                        e.release(r)
                yield LevelRow(fam.name, level, n, right, tokens / n, cut / n)


def main(argv: Sequence[str] | None = None) -> int:
    from edge_adapt.errors import EdgeAdaptError, check_count
    from edge_adapt.tasks import get_family
    from edge_adapt.tasks.registry import FAMILIES

    ap = argparse.ArgumentParser(prog="python -m edge_adapt.tasks.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", help=f"families to measure (default all: {', '.join(FAMILIES)})")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per level")
    ap.add_argument("--split", default="validation", choices=[s for s in SPLITS if s != "test"])
    ap.add_argument("--max-tokens", type=int, default=None, help="default: each family's own")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None, help="the gsm8k family's GSM8K-format .jsonl (default: "
                                                             "../shared/data/gsm8k/train.jsonl from here)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--dump", type=Path, default=None, help="append every reply to this JSONL file")
    args = ap.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown[0]!r}: choose from {', '.join(FAMILIES)}")
    try:
        # Checked before the table starts: a count of 0 would divide by zero, a negative one print nonsense rows.
        check_count("--prompts", args.prompts)
        check_count("--batch", args.batch)
        for flag, value in (("--max-tokens", args.max_tokens), ("--threads", args.threads)):
            if value is not None:
                check_count(flag, value)
        print(HEADER, flush=True)
        for row in measure([get_family(f, args.data) for f in args.families or FAMILIES], args.prompts, args.split,
                           args.max_tokens, args.threads, args.model, args.dump, args.batch):
            print(row.markdown(), flush=True)
    except EdgeAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
