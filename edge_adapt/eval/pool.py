"""The sample pool: K i.i.d. samples per prompt (plus one greedy sample), generated once and cached on disk.

Per sample it records the text, token count, per-token log-probabilities, the self-eval score p_keep at each
prune point (for samples still generating there) and at the end, the self-eval tokens each score cost, the
extracted answer and its correctness. Replays (replay.py) read only this record.

Cache: one JSONL file per (model, suite, settings) under the cache directory, one line per prompt, appended and
fsync'ed as soon as the prompt is done. Every line carries its prompt key, a hash of everything that could change
the samples (model fingerprint and adapter hash, self-eval identity and config, suite name, prompt id and text,
reference answer, K, sampling settings, max_tokens, prune points, seed); a line whose key does not match is
never reused. A run killed midway loses at most the prompt in flight; rerunning generates only missing prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_adapt.engine import GREEDY, Engine, Sample, SamplingParams
from edge_adapt.engine.text import TextStream
from edge_adapt.errors import ModelFileError, UsageError, is_number, one_line
from edge_adapt.fileio import check_user_file, os_error_message
from edge_adapt.progress import Job, Progress
from edge_adapt.tasks.base import Problem, Suite, stable_hash
from edge_adapt.tasks.scorers import Scorer

if TYPE_CHECKING:
    from edge_adapt.backends import PoolBackend


class SelfEvalScorer(Protocol):
    """What the pool needs from self-evaluation (edge_adapt.selfeval.SelfEvaluator has this shape): p_keep per
    sample, computed on scratch extensions so the samples' own KV stays as it was and generation can go on."""

    def score(self, samples: Sequence[Sample]) -> list[float]: ...


@dataclass(frozen=True)
class PoolSettings:
    """Everything about how a pool is generated. Sample j of a prompt uses seed stable_hash(seed, prompt id, j)."""

    k: int = 16
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    max_tokens: int | None = 96  # None: each problem's own budget (a mix's families differ), see Problem.budget
    prune_points: tuple[int, ...] = (16, 32)
    seed: int = 0

    def budget(self, problem: Problem) -> int:
        """Tokens a reply to `problem` may take in this pool."""
        return problem.budget(self.max_tokens)

    def params(self, problem_id: str) -> list[SamplingParams]:
        return [
            SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                           seed=stable_hash(self.seed, problem_id, j) % 2**31)
            for j in range(self.k)
        ]


@dataclass(frozen=True)
class PoolSample:
    index: int  # -1 for the greedy sample
    temperature: float
    seed: int
    text: str
    n_tokens: int
    logprobs: tuple[float, ...]
    finish: str
    scores: tuple[float | None, ...]  # p_keep at each prune point; None when the sample had finished before it
    end_score: float
    selfeval_tokens: tuple[float, ...]  # self-eval tokens each score cost, per prune point (0 if unscored) + end
    extracted: str | None
    correct: bool
    tokens: tuple[int, ...] = ()  # the response's token ids as decoded into its KV (no end-of-generation token)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    def score_at(self, point: int) -> float:
        """The score a pruner at prune point `point` (an index into prune_points) sees: the end score when the
        sample had already finished (its text is final, so it is the same text being scored)."""
        s = self.scores[point]
        return self.end_score if s is None else s


@dataclass(frozen=True)
class PromptPool:
    key: str
    problem_id: str
    level: int | None
    answer: str
    prompt_tokens: int
    samples: tuple[PoolSample, ...]
    greedy: PoolSample
    wall_s: float
    prompt_ids: tuple[int, ...] = ()
    sample_key: str = ""  # what the samples depend on (not the scorer or prune points): see sample_key()
    rescore_s: float = 0.0  # when the samples came from another pool and were only scored again: that time

    def to_json(self) -> str:
        d = asdict(self)
        for s in (*d["samples"], d["greedy"]):  # an unscored pool (NaN in memory) is null on disk: JSON has no NaN
            if math.isnan(s["end_score"]):
                s["end_score"] = None
        return json.dumps(d, separators=(",", ":"))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PromptPool:
        def ps(x: dict[str, Any]) -> PoolSample:
            return PoolSample(**{**x, "logprobs": tuple(x["logprobs"]), "scores": tuple(x["scores"]),
                                 "selfeval_tokens": tuple(x["selfeval_tokens"]), "tokens": tuple(x.get("tokens", ()))})
        return PromptPool(**{**d, "samples": tuple(ps(s) for s in d["samples"]), "greedy": ps(d["greedy"]),
                             "prompt_ids": tuple(d.get("prompt_ids", ()))})


def file_hash(path: Path | None) -> str:
    if path is None:
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_identity(engine: Engine, scorer: object, adapter_path: Path | None = None) -> str:
    """Model fingerprint + adapter hash + the self-eval scorer's class and config."""
    cfg = getattr(scorer, "config", None)
    cfg_s = cfg.model_dump_json() if hasattr(cfg, "model_dump_json") else repr(cfg)
    if adapter_path is None:  # the scorer may have picked one itself (the default model's shipped adapter)
        adapter_path = getattr(cfg, "adapter", None)
    cls = f"{type(scorer).__module__}.{type(scorer).__qualname__}"
    return f"{engine.fingerprint}|adapter={file_hash(adapter_path)}|selfeval={cls}:{cfg_s}"


def settings_key(identity: str, suite: str, settings: PoolSettings) -> str:
    return hashlib.sha256(f"{identity}|{suite}|{sorted(asdict(settings).items())}".encode()).hexdigest()[:16]


def sample_key(fingerprint: str, suite: str, settings: PoolSettings, problem: Problem) -> str:
    """Everything the samples themselves depend on. Scoring runs on scratch forks and never changes a sample,
    so pools made with another scorer or other prune points hold the same samples under this key. A family's
    problem is keyed by its family and its own reply budget, so a mix's pool and the family's own pool with the
    same settings hold the same samples under one key (a family suite's key is what it always was)."""
    sampling = {k: v for k, v in sorted(asdict(settings).items()) if k != "prune_points"}
    sampling["max_tokens"] = settings.budget(problem)
    source = problem.family or suite
    blob = f"{fingerprint}|{source}|{sampling}|{problem.id}|{problem.text}|{problem.answer}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def prompt_key(settings_k: str, problem: Problem) -> str:
    blob = f"{settings_k}|{problem.id}|{problem.text}|{problem.answer}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_Score = Annotated[float, Field(ge=0, le=1)]  # p_keep: a probability (NaN and infinities fail both bounds)


class _CachedSample(BaseModel):
    """A cached PoolSample as it must read back (pydantic: the cache is a file a person can edit)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    index: int = Field(ge=-1)
    temperature: float = Field(ge=0, allow_inf_nan=False)
    seed: int
    text: str
    n_tokens: int = Field(ge=0)
    logprobs: tuple[Annotated[float, Field(le=0)], ...]  # -inf is a log-probability, NaN and +inf are not
    finish: str
    scores: tuple[_Score | None, ...]
    # null: unscored (a remote pool sampled for labels only; earlier versions wrote NaN for it)
    end_score: float | None
    selfeval_tokens: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...]
    extracted: str | None
    correct: bool
    tokens: tuple[Annotated[int, Field(ge=0)], ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> _CachedSample:
        if self.end_score is not None and not (math.isnan(self.end_score) or 0 <= self.end_score <= 1):
            raise ValueError(f"end_score {self.end_score} is not in [0, 1]")
        if len(self.logprobs) != self.n_tokens:
            raise ValueError(f"{len(self.logprobs)} log-probabilities for n_tokens {self.n_tokens}")
        if len(self.tokens) > self.n_tokens:
            raise ValueError(f"{len(self.tokens)} token ids for n_tokens {self.n_tokens}")
        if len(self.selfeval_tokens) != len(self.scores) + 1:
            raise ValueError(f"{len(self.selfeval_tokens)} self-eval costs for {len(self.scores)} prune scores + the end")
        return self

    @property
    def scored(self) -> bool:
        return self.end_score is not None and not math.isnan(self.end_score)


class _CachedPool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    problem_id: str
    level: int | None
    answer: str
    prompt_tokens: int = Field(ge=0)
    samples: tuple[_CachedSample, ...] = Field(min_length=1)
    greedy: _CachedSample
    wall_s: float = Field(ge=0, allow_inf_nan=False)
    prompt_ids: tuple[Annotated[int, Field(ge=0)], ...] = ()
    sample_key: str = ""
    rescore_s: float = Field(0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> _CachedPool:
        if [s.index for s in self.samples] != list(range(len(self.samples))) or self.greedy.index != -1:
            raise ValueError("sample indices are not 0 ... K-1 and -1 for the greedy sample")
        every = (*self.samples, self.greedy)
        if len({len(s.scores) for s in every}) != 1:
            raise ValueError("samples scored at different numbers of prune points")
        # A pool is scored or not as a whole: one missing score is an edit, not an unscored pool.
        unscored_at_points = not every[0].scored and any(x is not None for s in every for x in s.scores)
        if len({s.scored for s in every}) != 1 or unscored_at_points:
            raise ValueError("some samples are scored and some are not")
        if self.prompt_ids and len(self.prompt_ids) != self.prompt_tokens:
            raise ValueError(f"{len(self.prompt_ids)} prompt ids for prompt_tokens {self.prompt_tokens}")
        return self


def _cut_short(raw: bytes) -> bool:
    """Whether a line is JSON that stops before its end, as a killed write leaves it. Before this version a resumed
    run appended after such a line without removing it; it holds no value that could be read, so it is skipped."""
    try:
        text = raw.decode("ascii")  # the cache is written with ensure_ascii: other bytes were put there
        json.loads(text)
    except UnicodeDecodeError:
        return False
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith("{"):
            return False
        if exc.msg.startswith("Unterminated string"):  # the line ends inside a string
            return True
        if exc.msg.startswith("Invalid \\uXXXX"):  # or inside a \uXXXX escape
            return len(text) - exc.pos <= 6
        rest = text[exc.pos:].rstrip()  # where parsing stopped: the end, or a number or literal the cut broke off
        return not rest or _NUMBER_PART.fullmatch(rest) is not None or any(w.startswith(rest) for w in _LITERALS)
    return False


_NUMBER_PART = re.compile(r"[-+.eE0-9]+")
_LITERALS = ("true", "false", "null")


def _unscored_as_nan(s: dict[str, Any]) -> dict[str, Any]:
    return {**s, "end_score": math.nan if s["end_score"] is None else s["end_score"]}


class PoolCache:
    """Append-only JSONL store of PromptPools, one line each.

    Only a write a killed run did not finish is ignored: a last line without its newline (the next append cuts
    it off), or such a line an earlier version left mid-file (JSON that stops short). Any other line that does not
    read back as a whole pool (K samples, scores in [0, 1], token counts that agree) was changed by hand or by
    something else, and would silently skew every metric computed from it: it is a one-line error naming the
    line, never skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelFileError(os_error_message(self.path.parent, exc)) from None

    def load(self, k: int | None = None) -> dict[str, PromptPool]:
        """The pools by key; `k`: the samples per prompt every line must hold (else the file's first line's)."""
        out: dict[str, PromptPool] = {}
        if not (self.path.exists() or self.path.is_symlink()):
            return out
        check_user_file(self.path)  # a folder or a FIFO in its place is a one-line error, not a traceback or a hang
        lines = self.path.read_bytes().split(b"\n")
        for lineno, raw in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline, a torn write or b""
            if not raw.strip():
                continue
            try:
                got = _CachedPool.model_validate_json(raw)
            except ValidationError as exc:
                if _cut_short(raw):  # a killed write that an earlier version's resume left mid-file: regenerated
                    continue
                raise self._corrupt(lineno, one_line(exc, "").removeprefix(": ")) from None
            if k is None:
                k = len(got.samples)
            if len(got.samples) != k:
                raise self._corrupt(lineno, f"{len(got.samples)} samples, not K={k}")
            d = got.model_dump()
            d["samples"] = [_unscored_as_nan(x) for x in d["samples"]]
            d["greedy"] = _unscored_as_nan(d["greedy"])
            pool = PromptPool.from_dict(d)
            out[pool.key] = pool
        return out

    def _corrupt(self, lineno: int, why: str) -> UsageError:
        return UsageError(f"{self.path}:{lineno} is corrupt ({why:.200}); delete the line or the file")

    def append(self, pool: PromptPool) -> None:
        self._drop_torn_tail()
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(pool.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_torn_tail(self) -> None:
        """Cut a last line a killed run left without its newline, so it never ends up mid-file."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            fh.truncate(fh.read().rfind(b"\n") + 1)


@dataclass(frozen=True)
class PoolProgress:
    """Yielded once per prompt by `build_pool`: the caller renders progress (rich, logs, nothing)."""

    done: int
    total: int
    generated: bool  # False when the prompt came from the cache
    pool: PromptPool
    tokens: int = field(default=0)
    rescored: bool = False  # its samples came from an earlier pool and were scored again in this run


class NoSelfEval:
    """Sampling without scores (labelling needs the samples only): its pools are unscored, NaN in memory and null
    on disk."""

    config = None

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [math.nan] * len(samples)


def _score(engine: Engine, scorer: SelfEvalScorer, samples: list[Sample]) -> tuple[list[float], float]:
    """Scores and the self-eval tokens each cost (decoded tokens during scoring / samples scored)."""
    if not samples:
        return [], 0.0
    if isinstance(scorer, NoSelfEval):
        return scorer.score(samples), 0.0
    before = engine.decoded_tokens
    scores = list(scorer.score(samples))
    name = f"{type(scorer).__module__}.{type(scorer).__qualname__}"
    if len(scores) != len(samples):
        raise UsageError(f"self-evaluator {name} returned {len(scores)} scores for {len(samples)} samples")
    for x in scores:
        # p_keep is a probability: NaN or 7.5 would pass through every metric and ranking silently.
        if not is_number(x) or not 0.0 <= float(x) <= 1.0:
            raise UsageError(f"self-evaluator {name} returned the score {x!r:.40}; a score must be a number in [0, 1]")
    return [float(x) for x in scores], (engine.decoded_tokens - before) / len(samples)


def generate_prompt_pool(
    engine: Engine, scorer: SelfEvalScorer, suite: Suite, problem: Problem, settings: PoolSettings, key: str,
) -> PromptPool:
    """Decode the prompt once, fork K sampled + 1 greedy sample, advance them together to each prune point and
    score the ones still generating, then run to the end and score all of them."""
    t0 = time.perf_counter()
    tokens = engine.chat_tokens(list(problem.messages))
    with engine.opened(tokens) as root:  # the samples forked from it go back with it
        samples = engine.start(root, [*settings.params(problem.id), GREEDY], max_tokens=settings.budget(problem))
        n_pts = len(settings.prune_points)
        at: list[list[float | None]] = [[None] * n_pts for _ in samples]
        cost: list[list[float]] = [[0.0] * (n_pts + 1) for _ in samples]
        for i, point in enumerate(settings.prune_points):
            for _ in engine.advance(samples, until=point):
                pass
            live = [s for s in samples if s.finish is None]
            scores, c = _score(engine, scorer, live)
            for s, v in zip(live, scores):
                at[s.index][i] = v
                cost[s.index][i] = c
        for _ in engine.advance(samples):
            pass
        end, c = _score(engine, scorer, samples)
        records = []
        check = suite.scorer_of(problem)  # a mix's problems each carry their family's scorer
        for s, v in zip(samples, end):
            cost[s.index][n_pts] = c
            greedy = s.index == settings.k
            records.append(PoolSample(
                index=-1 if greedy else s.index, temperature=s.params.temperature, seed=s.params.seed,
                text=s.text, n_tokens=len(s.generated), logprobs=tuple(round(x, 5) for x in s.logprobs),
                finish=s.finish or "length", scores=tuple(at[s.index]), end_score=v,
                selfeval_tokens=tuple(cost[s.index]), extracted=check.extract(s.text),
                correct=bool(check.correct(s.text, problem.answer)), tokens=tuple(s.seq.tokens[len(tokens):]),
            ))
    return PromptPool(key, problem.id, problem.level, problem.answer, len(tokens), tuple(records[:-1]), records[-1],
                      time.perf_counter() - t0, tuple(tokens), sample_key(engine.fingerprint, suite.name, settings, problem))


def _replayable(pool: PromptPool) -> bool:
    """Whether every sample recorded the exact token ids it decoded (what rescoring feeds back)."""
    return bool(pool.prompt_ids) and all(
        len(s.tokens) == s.n_tokens - (s.finish == "eos") for s in (*pool.samples, pool.greedy))


def _as_sample(engine: Engine, index: int, seq: Any, tokens: Sequence[int]) -> Sample:
    """A recorded response as the Sample a scorer expects: its sequence, token ids and text so far."""
    stream = TextStream()
    stream.text = engine.detokenize(tokens)
    return Sample(index, seq, GREEDY, len(tokens) or 1, stream, np.random.default_rng(0), list(tokens))


def rescore_prompt_pool(
    engine: Engine, scorer: SelfEvalScorer, settings: PoolSettings, key: str, other: PromptPool,
) -> PromptPool:
    """The same samples as `other` (same model, prompt, sampling settings and seeds) scored by `scorer` at
    `settings.prune_points` and at the end. Each sample's recorded token ids are decoded behind the prompt up
    to each prune point (a batched prefill, not generation), so the KV a score reads holds exactly what it held
    when the sample was generated; a sample is scored at a point only if it was still generating there."""
    t0 = time.perf_counter()
    records = [*other.samples, other.greedy]
    with engine.opened(list(other.prompt_ids)) as root:  # the samples forked from it go back with it
        seqs = [engine.fork(root) for _ in records]
        n_pts = len(settings.prune_points)
        at: list[list[float | None]] = [[None] * n_pts for _ in records]
        cost: list[list[float]] = [[0.0] * (n_pts + 1) for _ in records]
        done = [0] * len(records)
        for i, point in enumerate(settings.prune_points):
            live = [j for j, r in enumerate(records) if r.n_tokens > point]
            engine.extend([(seqs[j], records[j].tokens[done[j]:point]) for j in live])
            for j in live:
                done[j] = point
            scores, c = _score(engine, scorer, [_as_sample(engine, j, seqs[j], records[j].tokens[:point]) for j in live])
            for j, v in zip(live, scores):
                at[j][i], cost[j][i] = v, c
        engine.extend([(seqs[j], r.tokens[done[j]:]) for j, r in enumerate(records) if len(r.tokens) > done[j]])
        end, c = _score(engine, scorer, [_as_sample(engine, j, q, r.tokens) for j, (q, r) in enumerate(zip(seqs, records))])
    new = [replace(r, scores=tuple(at[j]), end_score=end[j], selfeval_tokens=(*cost[j][:n_pts], c))
           for j, r in enumerate(records)]
    # wall_s stays the generation's: these samples cost that to make; rescoring adds only `rescore_s`.
    return replace(other, key=key, samples=tuple(new[:-1]), greedy=new[-1], rescore_s=time.perf_counter() - t0)


def build_pool(
    engine: Engine, scorer: SelfEvalScorer, suite: Suite, settings: PoolSettings, cache_dir: Path,
    identity: str | None = None, reuse: Mapping[str, PromptPool] | None = None,
    rescore: Mapping[str, PromptPool] | None = None,
) -> Iterator[PoolProgress]:
    """`build_pool_from` with the in-process engine and `scorer` as the backend."""
    from edge_adapt.backends import LocalBackend

    backend = LocalBackend(engine, scorer, identity=identity)
    return build_pool_from(backend, suite, settings, cache_dir, reuse=reuse, rescore=rescore)


def build_pool_from(
    backend: PoolBackend, suite: Suite, settings: PoolSettings, cache_dir: Path,
    reuse: Mapping[str, PromptPool] | None = None, rescore: Mapping[str, PromptPool] | None = None,
) -> Iterator[PoolProgress]:
    """Yield each prompt's pool in suite order, from the cache when its key is there, else made by `backend`
    and appended to the cache as soon as it is done (a remote backend makes several at once). Drain it to get
    the whole pool; stop early and nothing done is lost.

    `reuse` (by sample_key, see samples_in): pools from other caches whose samples are the ones this pool would
    generate; they are taken as they are (their scores are the other scorer's, so only pass them to callers
    that read the samples, not the scores) and stored under this cache's key.
    `rescore` (by sample_key): the same, but their samples are scored again by this scorer (a new adapter on
    old samples costs a prefill and the suffixes, not a generation)."""
    sk = settings_key(backend.identity, suite.name, settings)
    cache = PoolCache(Path(cache_dir) / f"pool-{suite.name}-{sk}.jsonl")
    have = cache.load(settings.k)
    plan: list[tuple[str, PromptPool | None]] = []  # per problem: its key and a pool to take or rescore
    work: list[tuple[Problem, str]] = []
    for problem in suite.problems:
        key = prompt_key(sk, problem)
        skey = sample_key(backend.fingerprint, suite.name, settings, problem)
        other = rescore.get(skey) if rescore else None
        if key in have:
            plan.append((key, None))
        elif reuse and skey in reuse:
            have[key] = replace(reuse[skey], key=key)
            cache.append(have[key])
            plan.append((key, None))
        elif other is not None and _replayable(other) and len(other.samples) == settings.k:
            plan.append((key, other))
        else:
            plan.append((key, None))
            work.append((problem, key))
    made = backend.generate(work, suite, settings) if work else iter(())  # pools come in the order they finish
    fresh: set[str] = set()
    for i, (key, other) in enumerate(plan):
        rescored = other is not None and key not in have
        if rescored:
            have[key] = backend.rescore(settings, key, other)
            cache.append(have[key])
        while key not in have:
            pool = next(made)
            cache.append(pool)
            have[pool.key] = pool
            fresh.add(pool.key)
        pool = _judged(have[key], suite.scorer_of(suite.problems[i]))
        generated = key in fresh
        fresh.discard(key)
        tokens = sum(s.n_tokens for s in pool.samples) + pool.greedy.n_tokens if generated else 0
        yield PoolProgress(i + 1, len(plan), generated, pool, tokens, rescored)


def _judged(pool: PromptPool, check: Scorer) -> PromptPool:
    """The pool with each reply's answer extracted and marked right or wrong by `check` now: the cache keys
    what the replies depend on, not the scorer, so a pool made under another --scorer is judged again here."""
    def one(s: PoolSample) -> PoolSample:
        extracted, correct = check.extract(s.text), bool(check.correct(s.text, pool.answer))
        return s if (s.extracted, s.correct) == (extracted, correct) else replace(s, extracted=extracted, correct=correct)

    return replace(pool, samples=tuple(one(s) for s in pool.samples), greedy=one(pool.greedy))


@dataclass(frozen=True)
class PoolRun:
    """A whole pool as `pool_job` returns it."""

    pools: list[PromptPool]
    generated: int  # prompts generated in this run (the others came from a cache)
    tokens: int  # tokens generated in this run
    wall_s: float


def pool_job(task: str, steps: Iterator[PoolProgress]) -> Job[PoolRun]:
    """Drain `build_pool(...)`, yielding Progress per prompt (the generation rate, or 'cached'), then a line that
    says how many prompts were generated, how many scored again from an earlier pool, and how many read from the
    cache (a resumed run says so)."""
    pools: list[PromptPool] = []
    generated = tokens = rescored = 0
    t0 = time.perf_counter()
    for step in steps:
        pools.append(step.pool)
        generated += step.generated
        rescored += step.rescored
        tokens += step.tokens
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        yield Progress(task, step.done, step.total, f"{rate:.0f} tok/s" if generated else
                       "scored again" if rescored else "cached")
    wall_s = time.perf_counter() - t0
    cached = len(pools) - generated - rescored
    made = f"{generated} generated ({tokens} tokens in {wall_s:.0f} s)" if generated else ""
    again = f"{rescored} scored again from an earlier pool" if rescored else ""
    from_cache = f"{cached} read from the cache" if cached else ""
    yield Progress(task, len(pools), len(pools), message=f"{task}: {len(pools)} prompts, "
                   + ", ".join(x for x in (made, again, from_cache) if x))
    return PoolRun(pools, generated, tokens, wall_s)


# How build_pool_from names a cache file: the suite's name, then its 16-hex-digit settings key.
_POOL_FILE = re.compile(r"pool-(?P<suite>.+)-[0-9a-f]{16}\.jsonl")


def pool_sources(suite: Suite) -> frozenset[str]:
    """The suite parts of the cache files whose pools could hold `suite`'s samples (sample_key keys a problem by
    its family, else by its suite's name): this suite's own files, its families' own, and a mix's (a mix draws
    from every family)."""
    families = {p.family for p in suite.problems if p.family is not None}
    return frozenset({suite.name, *families, *(("mix",) if families else ())})


def samples_in(cache_dir: Path, suite: Suite) -> dict[str, PromptPool]:
    """The cached prompt pools that could hold `suite`'s samples and recorded their token ids, by sample_key.
    Only the files named `pool-<source>-<key>.jsonl` for a source of pool_sources(suite) are read, so a corrupt
    line in another suite's pool does not stop this one."""
    sources = pool_sources(suite)
    out: dict[str, PromptPool] = {}
    for f in sorted(Path(cache_dir).glob("pool-*.jsonl")):
        m = _POOL_FILE.fullmatch(f.name)
        if m is None or m["suite"] not in sources:
            continue
        for pool in PoolCache(f).load().values():
            if pool.sample_key and pool.prompt_ids:
                out[pool.sample_key] = pool
    return out
