"""`python -m edge_adapt.eval [--debug] key=value ...`: run_eval without the CLI (values are JSON where not plain
strings). It ends as `edge-adapt` does: an error, Ctrl-C or a bug is one line on stderr (exit 1 or 2, 130, 70);
`--debug` shows a bug's traceback.

    python -m edge_adapt.eval suite=arith split=test n_prompts=200 k=16 max_tokens=96 'prune_points=[16,32]' \
        'live=["best-of-8","adaptive"]' out_dir=docs/baseline-arith force=true
"""

from __future__ import annotations

import json
import sys

from edge_adapt import interrupts
from edge_adapt.errors import UsageError, validated
from edge_adapt.eval import EvalConfig, run_eval

DEBUG = "--debug"


def parse(argv: list[str]) -> EvalConfig:
    fields: dict[str, object] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {arg!r}")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    return validated(EvalConfig, fields, "eval")


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and return 0; anything else ends the process (SystemExit) with one line."""
    args = sys.argv[1:] if argv is None else argv
    debug = DEBUG in args
    with interrupts.entry_point(lambda: debug):
        report = run_eval(parse([a for a in args if a != DEBUG]))
    print(f"wrote {report.title}: {report.prompts} prompts, {len(report.strategies)} strategy rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
