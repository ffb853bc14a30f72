"""A stand-in for edge_adapt.selfeval.SelfEvaluator (not in this branch): the same suffix + two-logit p_keep.

p_keep = P("No") / (P("Yes") + P("No")) for the next token after the reply, closed as an assistant turn, and the
question "Would you do better if you started over?" (Manvi et al. 2024). Scored on `Engine.scratch` extensions
in one batched decode, so the samples' own KV, tokens and logits are untouched. Used by the pool tests and for
the provisional baseline report (`selfeval="tests.test_eval_standin:StandInSelfEval"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

SUFFIX = ("<|im_end|>\n<|im_start|>user\nWould you do better if you started over? (\"Yes.\" or \"No.\")<|im_end|>\n"
          "<|im_start|>assistant\n")


class StandInSelfEval:
    """Test stand-in; the real one is edge_adapt.selfeval.SelfEvaluator."""

    def __init__(self, engine, config=None, adapter_path=None) -> None:
        self.engine = engine
        self.config = {"suffix": SUFFIX, "kind": "standin"}
        self.suffix = engine.tokenize(SUFFIX)
        self.yes = engine.tokenize("Yes")[0]
        self.no = engine.tokenize("No")[0]

    def score(self, samples: Sequence) -> list[float]:
        e = self.engine
        with e.scratch([s.seq for s in samples]) as tmp:
            e.extend([(t, list(self.suffix)) for t in tmp])
            rows = np.stack([t.logits for t in tmp]).astype(np.float64)
        y, n = rows[:, self.yes], rows[:, self.no]
        return (1.0 / (1.0 + np.exp(y - n))).tolist()


@pytest.fixture(scope="module")
def engine():
    from edge_adapt.engine import Engine

    with Engine(parallel=6, ctx=256) as e:
        yield e


def test_standin_scores_without_touching_the_samples(engine):
    from edge_adapt.engine import SamplingParams

    root = engine.open(engine.tokenize(engine.chat_prompt([{"role": "user", "content": "What is 2 + 3?"}])))
    samples = engine.start(root, [SamplingParams(temperature=0.7, seed=i) for i in range(3)], max_tokens=6)
    try:
        for _ in engine.advance(samples, until=3):
            pass
        before = [(list(s.seq.tokens), s.seq.n_past, s.seq.logits.copy()) for s in samples]
        scores = StandInSelfEval(engine).score(samples)
        assert all(0.0 <= x <= 1.0 for x in scores)
        for s, (toks, n_past, logits) in zip(samples, before):
            assert s.seq.tokens == toks and s.seq.n_past == n_past
            assert np.array_equal(s.seq.logits, logits)
        again = StandInSelfEval(engine).score(samples)
        assert np.allclose(scores, again, atol=1e-4)  # the scratch left nothing behind
        for _ in engine.advance(samples):
            pass
        assert all(s.finish for s in samples)
    finally:
        for s in samples:
            engine.release(s.seq)
        engine.release(root)
