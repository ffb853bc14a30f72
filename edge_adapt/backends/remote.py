"""An OpenAI-compatible server as a pool backend: vLLM, llama.cpp's llama-server, `edge-adapt serve`.

Prompts are rendered with the model's chat template and tokenized here, from the local GGUF's vocabulary, and
sent as token ids to `/v1/completions`, so the server decodes exactly the prompt the local engine would.

Samples: one request per sample (n=1), each with the sample's own seed, not one request with n=K. The pool's
seeds are per sample (edge_adapt.eval.pool.PoolSettings.params); servers derive the seeds of n choices their
own way (edge-adapt serve: seed + i; vLLM has returned n identical choices for one seed), so only per-sample
requests make a pool reproducible on any server and identical to the local engine's for the same seeds. vLLM
runs n>1 as n child requests anyway, and its prefix cache shares the prompt within a batch (edge-adapt serve's
keeps a prompt once a request has ended: the K requests arriving together each decode it, docs/scale-out.md).
The reply's token ids come back as logprobs tokens named "token_id:<id>" (vLLM's return_tokens_as_token_ids,
which edge-adapt serve implements too) or as llama-server's `logprobs.content` ids: labels train on the exact ids
the server decoded.

Self-eval scores: one request per score to the server's self-eval model (edge-adapt serve lists
`<model>:selfeval`; vLLM serves the adapter as a LoRA module under its own name, llama-server per request)
with prompt + response + the self-eval suffix as token ids and max_tokens 1. A trained adapter shapes only the
difference of the two answer logits, so the answers themselves can rank in the hundreds (measured: ranks
100-600 for the shipped adapter); the request therefore biases both by +100 (OpenAI's logit_bias), which puts
them first and leaves their difference as it was, and reads p_keep = P(no) / (P(yes) + P(no)) from the top
log-probabilities, as edge_adapt.selfeval computes it. The server must report log-probabilities after the
bias, as OpenAI and edge-adapt serve do (vLLM: --logprobs-mode processed_logprobs; llama-server: its
post-sampling probabilities). The adapter must act on the suffix only, as on the device: edge-adapt serve and
llama-server do that (llama-server only one request at a time, see _llama_server_scoring); upstream vLLM applies
a LoRA to the whole request (docs/scale-out.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from edge_adapt.backends.http import KEY_ENV, Cancel, JsonClient, RemoteError, RetryPolicy
from edge_adapt.backends.workers import Workers
from edge_adapt.engine.chat import Message
from edge_adapt.engine.gguf_file import GGUFInfo
from edge_adapt.engine.sampling import GREEDY, SamplingParams
from edge_adapt.engine.vocab import TextModel, Vocab
from edge_adapt.errors import UsageError, is_whole

if TYPE_CHECKING:
    from edge_adapt.eval.pool import PoolSample, PoolSettings, PromptPool
    from edge_adapt.tasks.base import Problem, Suite

SCORE_LOGPROBS = 5  # the alternatives a score request asks for (OpenAI's most for completions)
ANSWER_BIAS = 100.0  # added to both answer tokens' logits: the most OpenAI's logit_bias allows


class RemoteOptions(BaseModel):
    """How to reach the server: what `--backend`, `--backend-model`, `--backend-selfeval` and `--concurrency`
    set."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="the served model's name (default: the one it serves)")
    selfeval_model: str | None = Field(None, description="the model name that scores (default: edge-adapt serve's "
                                                          "<model>:selfeval)")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at once")
    timeout_s: float = Field(300.0, gt=0, description="longest wait for one answer")
    give_up_s: float = Field(120.0, ge=0, description="longest a request is retried (429, 5xx, a restarting server)")

    def api_key(self) -> str | None:
        return os.environ.get(KEY_ENV) or None


@dataclass(frozen=True)
class Scoring:
    """How the server scores: the model name, the suffix ids to append, the answer tokens, and what
    identifies the judgement (adapter file hash, suffix) for the cache key."""

    model: str
    suffix: tuple[int, ...]
    yes_token: int
    no_token: int
    identity: str
    lora: int | None = None  # llama-server: the adapter's id in its request's `lora` list


@dataclass(frozen=True)
class Drawn:
    """One sample as the server returned it."""

    params: SamplingParams
    text: str
    ids: tuple[int, ...]  # decoded into its KV: the end-of-generation token left out
    logprobs: tuple[float, ...]  # one per drawn token, the end-of-generation token's included
    finish: str  # eos | stop | length


class RemoteBackend:
    """Pools from an OpenAI-compatible server; the local `vocab` renders and tokenizes prompts."""

    def __init__(self, options: RemoteOptions, vocab: TextModel, *, scores: bool,
                 selfeval_config: Any = None, client: JsonClient | None = None) -> None:
        self.options, self.vocab = options, vocab
        self.client = client or JsonClient(options.url, api_key=options.api_key(), timeout_s=options.timeout_s,
                                           retry=RetryPolicy(give_up_s=options.give_up_s))
        self._running: set[Cancel] = set()  # the Cancels of the generate and rescore calls under way
        cards = self._models()
        self.model = self._served_model(cards)
        # llama.cpp's llama-server (its model card says owned_by "llamacpp") lists token ids only when asked for
        # alternatives, selects adapters per request by id, and reports log-probabilities before logit_bias
        # unless asked for post-sampling probabilities: its requests are shaped for that.
        self.llama_server = any(c.get("id") == self.model and c.get("owned_by") == "llamacpp" for c in cards)
        self.scoring = self._scoring(cards, selfeval_config) if scores else None

    @classmethod
    def open(cls, options: RemoteOptions, model_path: Path | None, *, scores: bool,
             selfeval_config: Any = None) -> RemoteBackend:
        """The backend with the local GGUF's vocabulary (the embedded default model's when None)."""
        vocab = Vocab(model_path)
        try:
            return cls(options, vocab, scores=scores, selfeval_config=selfeval_config)
        except BaseException:
            vocab.close()
            raise

    # -- what the pool needs ----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return f"remote:{self.model}|tokenizer={self.vocab.fingerprint}"

    @property
    def identity(self) -> str:
        judged = self.scoring.identity if self.scoring is not None else "none"
        return f"{self.fingerprint}|selfeval={judged}"

    @property
    def model_path(self) -> Path:
        return self.vocab.model_path

    @property
    def info(self) -> GGUFInfo:
        """The local GGUF's description (its vocabulary is what the server's model was checked against)."""
        return self.vocab.info

    def chat_prompt(self, messages: list[Message]) -> str:
        return self.vocab.chat_prompt(messages)

    def generate(self, work: Sequence[tuple[Problem, str]], suite: Suite,
                 settings: PoolSettings) -> Iterator[PromptPool]:
        per_prompt = settings.k + 1
        prompts_at_once = max(1, math.ceil(self.options.concurrency / per_prompt)) + 1  # the next one queued
        cancel = Cancel()
        self._running.add(cancel)
        requests = Workers(self.options.concurrency, "edge-adapt-http")
        prompts = Workers(prompts_at_once, "edge-adapt-prompt")
        futures = [prompts.submit(self._prompt_pool, requests, cancel, suite, problem, settings, key)
                   for problem, key in work]
        try:
            for f in as_completed(futures):
                yield f.result()
        finally:  # an error, a Ctrl-C or a caller that stopped early: nothing more is sent, nothing waits on
            cancel.set()  # a retry sleep, a connection in use is shut
            for f in futures:
                f.cancel()
            requests.shutdown()  # first: the prompts waiting on requests not yet sent see them cancelled
            prompts.shutdown()
            self._running.discard(cancel)

    def rescore(self, settings: PoolSettings, key: str, other: PromptPool) -> PromptPool:
        cancel = Cancel()
        self._running.add(cancel)
        t0 = time.perf_counter()
        try:
            with Workers(self.options.concurrency, "edge-adapt-http") as requests:
                try:
                    records = [*other.samples, other.greedy]
                    scored = self._score_all(requests, cancel, list(other.prompt_ids), records, settings)
                except BaseException:
                    cancel.set()
                    raise
        finally:
            self._running.discard(cancel)
        return replace(other, key=key, samples=tuple(scored[:-1]), greedy=scored[-1],
                       rescore_s=time.perf_counter() - t0)

    def close(self) -> None:
        for cancel in list(self._running):
            cancel.set()
        self.vocab.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one prompt -------------------------------------------------------------------------------------------
    def _prompt_pool(self, requests: Workers, cancel: Cancel, suite: Suite, problem: Problem,
                     settings: PoolSettings, key: str) -> PromptPool:
        from edge_adapt.eval.pool import PoolSample, PromptPool, sample_key

        t0 = time.perf_counter()
        prompt = self.vocab.chat_tokens(list(problem.messages))
        params = [*settings.params(problem.id), GREEDY]
        drawn = _all(requests, [(self._draw, prompt, p, settings.budget(problem), cancel) for p in params], cancel)
        check = suite.scorer_of(problem)
        records = [
            PoolSample(index=i if i < settings.k else -1, temperature=d.params.temperature, seed=d.params.seed,
                       text=d.text, n_tokens=len(d.logprobs), logprobs=tuple(round(x, 5) for x in d.logprobs),
                       finish=d.finish, scores=(None,) * len(settings.prune_points), end_score=float("nan"),
                       selfeval_tokens=(0.0,) * (len(settings.prune_points) + 1), extracted=check.extract(d.text),
                       correct=bool(check.correct(d.text, problem.answer)), tokens=d.ids)
            for i, d in enumerate(drawn)
        ]
        if self.scoring is not None:
            records = self._score_all(requests, cancel, prompt, records, settings)
        return PromptPool(key, problem.id, problem.level, problem.answer, len(prompt), tuple(records[:-1]), records[-1],
                          time.perf_counter() - t0, tuple(prompt),
                          sample_key(self.fingerprint, suite.name, settings, problem))

    def _score_all(self, requests: Workers, cancel: Cancel, prompt: list[int], records: list[PoolSample],
                   settings: PoolSettings) -> list[PoolSample]:
        """Each sample scored at every prune point it was still generating at (its first `point` tokens) and at
        the end, as edge_adapt.eval.pool scores it in process."""
        assert self.scoring is not None
        asks: list[tuple[int, int | None]] = []  # (record, prune point index or None for the end)
        for j, r in enumerate(records):
            asks += [(j, i) for i, point in enumerate(settings.prune_points) if r.n_tokens > point]
            asks.append((j, None))
        calls = [(self._score, prompt + list(records[j].tokens[: settings.prune_points[i]] if i is not None
                                              else records[j].tokens), cancel) for j, i in asks]
        got = _all(requests, calls, cancel)
        cost = float(len(self.scoring.suffix))
        out = []
        for j, r in enumerate(records):
            at: list[float | None] = [None] * len(settings.prune_points)
            end = float("nan")
            for (jj, i), p in zip(asks, got):
                if jj == j and i is not None:
                    at[i] = p
                elif jj == j:
                    end = p
            out.append(replace(r, scores=tuple(at), end_score=end,
                               selfeval_tokens=(*(cost if s is not None else 0.0 for s in at), cost)))
        return out

    # -- one request ------------------------------------------------------------------------------------------
    def _draw(self, prompt: list[int], params: SamplingParams, max_tokens: int, cancel: Cancel) -> Drawn:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "n": 1,
                "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "min_p": params.min_p, "seed": params.seed, "logprobs": 1 if self.llama_server else 0,
                "return_tokens_as_token_ids": True}
        if params.repeat_penalty != 1.0:
            body["repeat_penalty"] = params.repeat_penalty
        choice = self._choice(self.client.post("/completions", body, cancel=cancel))
        text = choice.get("text")
        ids, lps, _ = _logprobs(choice, self.client.base)
        if not isinstance(text, str) or len(lps) != len(ids):
            raise RemoteError(f"{self.client.base}: a completion without its text and per-token log-probabilities")
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise RemoteError(f"{self.client.base}: unexpected finish_reason {reason!r}")
        finish = "length" if reason == "length" else "stop"
        n_vocab = self.vocab.model.n_vocab
        in_vocab = all(0 <= t < n_vocab for t in ids)  # before is_eog asks llama.cpp about one
        drawn = ids
        if in_vocab and ids and reason == "stop" and self.vocab.is_eog(ids[-1]):
            finish, drawn = "eos", ids[:-1]
        if not in_vocab or self.vocab.detokenize(drawn) != text:
            raise RemoteError(f"{self.client.base}: the reply's token ids do not spell its text with --model's "
                              f"vocabulary: does the server run the same model ({self.model})?")
        return Drawn(params, text, tuple(drawn), tuple(float(x) for x in lps), finish)

    def _score(self, ids: list[int], cancel: Cancel) -> float:
        assert self.scoring is not None
        s = self.scoring
        body: dict[str, Any] = {
            "model": s.model, "prompt": ids + list(s.suffix), "max_tokens": 1, "temperature": 1.0, "top_p": 1.0,
            "min_p": 0.0, "seed": 0, "logprobs": SCORE_LOGPROBS, "return_tokens_as_token_ids": True,
            "logit_bias": {str(s.yes_token): ANSWER_BIAS, str(s.no_token): ANSWER_BIAS}}
        if s.lora is not None:  # llama-server: the adapter by id, its probabilities after the bias
            body.update(model=self.model, lora=[{"id": s.lora, "scale": 1.0}], post_sampling_probs=True)
        choice = self._choice(self.client.post("/completions", body, cancel=cancel))
        _, _, tops = _logprobs(choice, self.client.base)
        if not tops or not tops[0]:
            raise RemoteError(f"{self.client.base}: the self-eval model {s.model} returned no top log-probabilities")
        top = tops[0]
        missing = [name for name, t in (("yes", s.yes_token), ("no", s.no_token)) if t not in top]
        if missing:
            raise RemoteError(f"{self.client.base}: the self-eval answer token{'s' if len(missing) > 1 else ''} "
                              f"{' and '.join(missing)} ({', '.join(str(t) for t in (s.yes_token, s.no_token))}) "
                              f"{'are' if len(missing) > 1 else 'is'} not among the top {SCORE_LOGPROBS} "
                              "log-probabilities the server returned although logit_bias raised them by "
                              f"{ANSWER_BIAS:.0f}: the server must apply logit_bias to the log-probabilities it reports")
        diff = float(top[s.no_token]) - float(top[s.yes_token])
        return 0.5 * (1.0 + math.tanh(0.5 * diff))

    def _choice(self, resp: Any) -> dict[str, Any]:
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            got = len(choices) if isinstance(choices, list) else "no"
            raise RemoteError(f"{self.client.base}: asked for one choice (n=1), got {got} choices")
        return choices[0]

    # -- what the server offers -------------------------------------------------------------------------------
    def _models(self) -> list[dict[str, Any]]:
        """The server's model list, retried for --backend-wait (a server still loading answers 503). edge-adapt
        serve lists its model before the weights have loaded, and its fingerprint and self-eval model only
        after: a list of its without them waits for /health (503 until loaded) and is read again."""
        cards = self._model_list()
        if any(c.get("owned_by") == "edge-adapt" and "edge_adapt" not in c for c in cards):
            self.client.get("/health", root=True)
            cards = self._model_list()
        return cards

    def _model_list(self) -> list[dict[str, Any]]:
        resp = self.client.get("/models")
        data = resp.get("data") if isinstance(resp, dict) else None
        if not isinstance(data, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in data):
            raise RemoteError(f"{self.client.base}/models: not an OpenAI model list")
        if not data:
            raise RemoteError(f"{self.client.base}/models lists no models: the server serves none (yet)")
        return data

    def _served_model(self, cards: list[dict[str, Any]]) -> str:
        ids = [c["id"] for c in cards]
        if self.options.model is not None:
            name = _alias(self.options.model, cards)
            if name not in ids:
                raise RemoteError(f"{self.client.base} serves {', '.join(ids)}, not {self.options.model!r} "
                                  "(--backend-model)")
            card = next(c for c in cards if c["id"] == name)
            if _scores(card):
                # edge-adapt serve's MODEL:selfeval answers only score requests: every sample would be a 400.
                raise UsageError(f"--backend-model {name} is the self-evaluation model of {card['parent']}, which "
                                 f"scores and does not sample: name the base model, --backend-model {card['parent']} "
                                 "(or leave it out)")
        else:
            bases = [c["id"] for c in cards if not c.get("parent")]
            if len(bases) != 1:
                raise RemoteError(f"{self.client.base} serves {len(bases)} models ({', '.join(bases)}): name one "
                                  "with --backend-model")
            name = bases[0]
        self._check_same_model(name, next(c for c in cards if c["id"] == name))
        return name

    def _check_same_model(self, name: str, card: dict[str, Any]) -> None:
        """edge-adapt serve publishes its GGUF's fingerprint: it must be --model's (the cache key names the
        served model and --model's fingerprint, so two servers of one name never mix pools). A server that
        publishes none (vLLM, llama-server) gets a warning when its model's name is not --model's."""
        block = card.get("edge_adapt")
        theirs = block.get("fingerprint") if isinstance(block, dict) else None
        mine = self.vocab.fingerprint
        if theirs is not None:
            if theirs != mine:
                raise RemoteError(f"{self.client.base} runs {name} ({theirs}), not the model of --model "
                                  f"{self.vocab.model_path.name} ({mine}): give --model the GGUF the server runs")
            return
        key = (self.client.base, name)
        if not _names_alike(name, self.vocab.model_path.stem) and key not in _WARNED:
            _WARNED.add(key)
            print(f"warning: {self.client.base} serves {name!r}, whose name is not --model's "
                  f"({self.vocab.model_path.stem}): it must be the same model (another with the same vocabulary "
                  "would pass every check)", file=sys.stderr, flush=True)

    def _scoring(self, cards: list[dict[str, Any]], selfeval_config: Any) -> Scoring:
        """The server's self-eval model: its card's `edge_adapt` block (edge-adapt serve) says the suffix, the
        answer tokens and the adapter, which must be the one the local self-evaluation would use (--adapter,
        --adapter none, or the default adapter); for another server (a LoRA module named with --backend-selfeval)
        they come from the local self-evaluation config, as the adapter was trained with them."""
        name = self.options.selfeval_model
        if self.llama_server:
            return self._llama_server_scoring(selfeval_config)
        if name == self.model:
            raise UsageError(f"--backend-selfeval {name} is the model that samples, not a self-evaluation model: "
                             "name the model that serves the adapter (vLLM: --lora-modules NAME=PATH)")
        if name is None:
            found = [c for c in cards if c.get("parent") == self.model and _scores(c)]
            if not found:
                raise RemoteError(f"{self.client.base} offers no self-evaluation model for {self.model}: serve the "
                                  "adapter (vLLM: --lora-modules NAME=PATH) and name it with --backend-selfeval")
            name = found[0]["id"]
        card = next((c for c in cards if c["id"] == name), None)
        if card is None:
            raise RemoteError(f"{self.client.base} serves no model {name!r} (--backend-selfeval)")
        block = card.get("edge_adapt")
        if isinstance(block, dict):
            try:
                suffix = tuple(_whole(t) for t in block["suffix_ids"])
                yes, no = _whole(block["yes_token"]), _whole(block["no_token"])
            except (KeyError, TypeError, ValueError):
                raise RemoteError(f"{self.client.base}: model {name} has a malformed edge_adapt block") from None
            self._check_adapter(name, block, selfeval_config)
            judged = f"{name}:adapter={block.get('adapter')}:{block.get('adapter_sha256')}:suffix={list(suffix)}"
        else:
            # The server says nothing of its adapter: the identity holds what it does say (vLLM lists a LoRA
            # module's path as `root`), never the local adapter, which it may not run.
            suffix, yes, no, config = self._local_suffix(selfeval_config)
            root = card.get("root") if card.get("parent") else None
            judged = f"{name}:root={root}:{_without_adapter(config)}"
        if not suffix or any(not 0 <= t < self.vocab.model.n_vocab for t in (*suffix, yes, no)):
            raise RemoteError(f"{self.client.base}: model {name}'s suffix or answer tokens are not --model's tokens")
        return Scoring(name, suffix, yes, no, judged)

    def _check_adapter(self, name: str, block: dict[str, Any], selfeval_config: Any) -> None:
        """The server's self-eval adapter (by content) is the one the local self-evaluation resolves to."""
        from edge_adapt.eval.pool import file_hash
        from edge_adapt.selfeval.evaluator import resolve_config

        wanted = resolve_config(self.vocab, selfeval_config, None).adapter
        theirs = block.get("adapter_sha256")
        if (file_hash(Path(wanted)) if wanted is not None else None) == theirs:
            return
        runs = f"adapter {block.get('adapter')}" if theirs is not None else "no adapter (--adapter none)"
        if wanted is None:
            raise RemoteError(f"{self.client.base}: its self-eval model {name} runs {runs}, not none (--adapter "
                              "none): start the server with --adapter none")
        explicit = getattr(selfeval_config, "adapter", None) is not None
        what = f"--adapter {Path(wanted).name}" if explicit else f"the default adapter {Path(wanted).name}"
        raise RemoteError(f"{self.client.base}: its self-eval model {name} runs {runs}, not {what} (start the "
                          f"server with that --adapter{'' if explicit else ', or pass --adapter none'})")

    def _local_suffix(self, selfeval_config: Any) -> tuple[tuple[int, ...], int, int, str]:
        """The suffix and answer tokens of the local self-eval config (the adapter's metadata, --adapter's)."""
        from edge_adapt.selfeval.evaluator import resolve_config
        from edge_adapt.selfeval.suffix import answer_token, render_suffix

        config = resolve_config(self.vocab, selfeval_config, None)
        suffix = tuple(render_suffix(config, self.vocab))
        yes, no = answer_token(self.vocab, config.yes, "yes"), answer_token(self.vocab, config.no, "no")
        return suffix, yes, no, config.model_dump_json()

    def _llama_server_scoring(self, selfeval_config: Any) -> Scoring:
        """llama-server: the adapter loaded with `--lora FILE` (id 0, or --backend-selfeval ID), switched on per
        request; an activated LoRA (trained with --method alora) acts from its invocation tokens on, as here."""
        root = self.client.root
        try:
            adapters = self.client.get("/lora-adapters", root=True)
        except RemoteError as exc:
            raise RemoteError(f"{exc} (start llama-server with --lora ADAPTER.gguf)") from None
        if self.options.concurrency > 1:
            # Measured with the llama-server of llama.cpp commit 0c1e570 (vendored by llama-cpp-python 0.3.36): requests with
            # an activated LoRA decoded together with others (scores or samples) come back with wrong
            # probabilities, up to 0.86 off p_keep against the same requests one at a time; one at a time they
            # agree with the in-process scores within 0.05.
            raise RemoteError(f"{self.client.base} is llama-server, whose per-request activated LoRA gives wrong "
                              "scores when requests are decoded together: score with --concurrency 1, or on "
                              "edge-adapt serve or in process (labels, which need no scores, are not affected)")
        name = self.options.selfeval_model or "0"
        found = [a for a in adapters if isinstance(a, dict) and is_whole(a.get("id")) and str(a["id"]) == name] \
            if isinstance(adapters, list) else []
        if not found:
            raise RemoteError(f"{root} has no LoRA adapter with id {name} (start llama-server with --lora "
                              "ADAPTER.gguf --lora-init-without-apply; --backend-selfeval names its id)")
        suffix, yes, no, config = self._local_suffix(selfeval_config)
        return Scoring(self.model, suffix, yes, no, f"lora:{found[0].get('path')}:{config}", lora=int(found[0]["id"]))


_WARNED: set[tuple[str, str]] = set()  # (server, model) pairs warned about once in this process
_QUANT = re.compile(r"[-_.](i?q\d\w*|f16|f32|bf16|fp16)$", re.IGNORECASE)


def _scores(card: dict[str, Any]) -> bool:
    """Whether a model card is edge-adapt serve's self-eval model: a child of the served model (as vLLM lists a
    LoRA module) whose `edge_adapt` block says how to ask it."""
    return bool(card.get("parent")) and isinstance(card.get("edge_adapt"), dict)


def _alias(name: str, cards: list[dict[str, Any]]) -> str:
    """The model id `name` stands for: edge-adapt serve answers to its model's id, its file name and 'default'
    (app.ServerState.accepts), so --backend-model takes them too, as the id (one cache key whichever is given);
    another server's names are its ids alone."""
    if any(c["id"] == name for c in cards):
        return name
    for c in cards:
        if c.get("owned_by") == "edge-adapt" and not c.get("parent") and name in ("default", f"{c['id']}.gguf"):
            return str(c["id"])
    return name


def _names_alike(served: str, stem: str) -> bool:
    """Whether a served model's name holds the GGUF file's stem (its quantization tag left out), letters and
    digits compared: "meta-llama/Llama-3.1-8B-Instruct" holds "llama-3.1-8b-instruct-q8_0"."""
    core = _QUANT.sub("", stem)
    alnum = [re.sub(r"[^a-z0-9]", "", s.lower()) for s in (served, core)]
    return bool(alnum[1]) and alnum[1] in alnum[0]


def _without_adapter(config_json: str) -> str:
    """A self-eval config (JSON) without its local adapter path."""
    data = json.loads(config_json)
    data.pop("adapter", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _all(pool: Workers, calls: list[tuple[Any, ...]], cancel: Cancel) -> list[Any]:
    """Run `calls` ((fn, *args) each) on `pool` and return their results in order; the first failure cancels
    the rest and is raised."""
    if cancel.is_set():
        raise RemoteError("stopped")
    futures: list[Future[Any]] = [pool.submit(fn, *args) for fn, *args in calls]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()


def _logprobs(choice: dict[str, Any], where: str) -> tuple[list[int], list[float], list[dict[int, float]]]:
    """Token ids, their log-probabilities and each step's top alternatives (by id), from either shape a server
    answers completions' logprobs in: OpenAI's parallel lists with tokens named "token_id:<id>" (vLLM's
    return_tokens_as_token_ids, edge-adapt serve), or llama-server's `content` list of {id, logprob,
    top_logprobs: [{id, logprob}]}."""
    lp = choice.get("logprobs")
    try:
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            items = lp["content"]
            ids = [_whole(x["id"]) for x in items]
            lps = [_lp(x) for x in items]
            tops = [{_whole(t["id"]): _lp(t) for t in x.get("top_logprobs") or x.get("top_probs") or ()} for x in items]
            return _finite(ids, lps, tops, where)
        if isinstance(lp, dict) and isinstance(lp.get("tokens"), list) and isinstance(lp.get("token_logprobs"), list):
            ids = [_token_id(t, where) for t in lp["tokens"]]
            lps = [float(x) for x in lp["token_logprobs"]]
            tops = [{_token_id(k, where): float(v) for k, v in (t or {}).items()} for t in lp.get("top_logprobs") or ()]
            return _finite(ids, lps, tops, where)
    except (KeyError, TypeError, ValueError):
        pass
    raise RemoteError(f"{where}: a completion without per-token log-probabilities by token id (logprobs.tokens / "
                      "token_logprobs, or logprobs.content)")


def _finite(ids: list[int], lps: list[float], tops: list[dict[int, float]],
            where: str) -> tuple[list[int], list[float], list[dict[int, float]]]:
    """The parsed log-probabilities, refused when one is NaN or infinite (an alternative may be -inf: a
    probability of 0); a pool would keep them, and a NaN score reads as "not scored"."""
    if not all(math.isfinite(x) for x in lps) or \
            any(math.isnan(x) or x == math.inf for top in tops for x in top.values()):
        raise RemoteError(f"{where}: a completion with log-probabilities that are not finite numbers (NaN or "
                          "infinity)")
    return ids, lps, tops


def _whole(v: Any) -> int:
    """A token id as JSON gives it: a whole number. int() of a float would truncate 2.7 to another token and fail
    on 1e400 (infinity) with an OverflowError; a ValueError instead, which the caller's RemoteError says."""
    if not is_whole(v):
        raise ValueError(f"a token id must be a whole number, got {v!r:.40}")
    return int(v)


def _lp(item: dict[str, Any]) -> float:
    """A llama-server entry's log-probability: `logprob`, or `prob` when it reports post-sampling probabilities."""
    if "logprob" in item:
        return float(item["logprob"])
    p = float(item["prob"])
    return math.log(p) if p > 0 else -math.inf


def _token_id(name: Any, where: str) -> int:
    if isinstance(name, str) and name.startswith("token_id:"):
        try:
            return int(name[len("token_id:"):])
        except ValueError:
            pass
    raise RemoteError(f"{where}: tokens are not named by id ({str(name)[:40]!r}); the server must support "
                      "return_tokens_as_token_ids (vLLM and edge-adapt serve do)")
