"""One small owner per llama.cpp C handle.

Each wrapper frees its handle through an ExitStack of idempotent callbacks, and a child registers its own
`close` on its parent's stack so that it is freed first (context before model, adapter before model).
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as ll
import numpy as np

from edge_adapt.engine.special_cuts import Special, safe_cuts
from edge_adapt.errors import ContextOverflowError, EngineError, ModelFileError, UsageError

_backend_lock = threading.Lock()
_backend_ready = False
_verbose = False


@ll.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if _verbose:
        sys.stderr.write(text.decode("utf-8", "replace"))


def init_backend(verbose: bool = False) -> None:
    """Initialise llama.cpp once per process; its own log output goes to stderr only when verbose."""
    global _backend_ready, _verbose
    with _backend_lock:
        _verbose = verbose
        if not _backend_ready:
            ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_ready = True


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this llama.cpp build runs AMX kernels (its system info line reads e.g. `AMX_INT8 = 1`)."""
    return re.search(rb"AMX_INT8 = 1", ll.llama_print_system_info()) is not None


@contextmanager
def llama_like_the_engine() -> Iterator[None]:
    """While it lasts, llama-cpp-python's own `Llama` loads weights as the engine does: on builds with AMX kernels
    without the extra buffer types (see cpu_has_amx's caller), so a side-by-side comparison runs the same kernels
    and neither side crashes. `Llama` takes no option for it: its default model parameters are adjusted."""
    if not cpu_has_amx():
        yield
        return
    default = ll.llama_model_default_params

    def params() -> ll.llama_model_params:
        p = default()
        p.use_extra_bufts = False
        return p

    ll.llama_model_default_params = params
    try:
        yield
    finally:
        ll.llama_model_default_params = default


def _unfreed(ptr: Any, handle: Any) -> Any:
    """`handle` while the object owning `ptr` is not freed: llama.cpp given a freed pointer crashes the process,
    so an engine used after close() gets an EngineError instead. Each handle makes its calls into llama.cpp
    holding its `_lock`, which freeing it takes too: a close from another thread (an app quitting while a worker
    reads a reply) waits for the call in progress instead of freeing memory under it."""
    if not ptr:
        raise EngineError("the engine is closed")
    return handle


class SharedLock:
    """Held by many threads at once (`shared`) or by one (`exclusive`), which waits for the others and keeps new
    ones out while it waits. The model's calls into llama.cpp read the vocabulary and may run side by side (as
    llama-server tokenizes in its HTTP threads while its loop decodes): a long tokenization must not hold up the
    decode loop's token lookups. Freeing the model is the exclusive use."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if not self._holders:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._holders:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# A text longer than this is looked at for special tokens to cut it at (edge_adapt.engine.special_cuts); below
# it, at most a few thousand special tokens fit, whose quadratic cost in llama.cpp is a few milliseconds.
CUT_ABOVE_BYTES = 1 << 14
SPECIALS_PER_PIECE = 256


MAX_SEQUENCE_IDS = ll.llama_max_parallel_sequences()  # a context holds at most this many sequences


def free_when_collected(owner: object, model: Model) -> None:
    """Give llama.cpp's memory back when `owner` (an Engine, a Vocab) is collected without close(): its model,
    and the context and buffers on the model's close stack, were never freed (300 MB per dropped engine of the
    default model). Not at interpreter exit, where the process's memory goes anyway and teardown order is not ours."""
    weakref.finalize(owner, model.close).atexit = False


class Model:
    """A loaded llama_model and its vocabulary."""

    def __init__(self, path: Path, *, gpu_layers: int = 0, use_mmap: bool = True, vocab_only: bool = False) -> None:
        params = ll.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = gpu_layers
        params.use_mmap = use_mmap
        # ggml's AMX kernels (Intel Sapphire Rapids and later) crash in ggml_backend_amx_mul_mat on batched
        # decodes of this model's Q4_1 weights (llama-cpp-python 0.3.36, segfault on the first prompt decode).
        # They are reached only through the "extra" weight buffer types, so builds with AMX load the weights
        # into plain CPU buffers; every other CPU keeps its repacked layouts.
        params.use_extra_bufts = not cpu_has_amx()
        ptr = ll.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelFileError(f"{path}: llama.cpp could not load this model (run with --verbose for its log)")
        self._ptr = ptr
        self._lock = SharedLock()
        self._stack = ExitStack()
        self._stack.callback(self._free)
        self._vocab = ll.llama_model_get_vocab(ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.eos = ll.llama_vocab_eos(self.vocab)
        self.bos = ll.llama_vocab_bos(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._specials: dict[bool, list[Special]] = {}
        # Whether a long text may be tokenized in pieces (Model._cuts): the tokenizers that treat each piece between
        # special tokens on their own (SentencePiece and BPE), and not where an end-of-text token is added after
        # the last piece.
        self._pieces_apart = ll.llama_vocab_type(self.vocab) in (ll.LLAMA_VOCAB_TYPE_SPM, ll.LLAMA_VOCAB_TYPE_BPE)
        self._adds_eos = bool(ll.llama_vocab_get_add_eos(self.vocab))

    def _free(self) -> None:
        if self._ptr:
            ll.llama_model_free(self._ptr)
            self._ptr = None

    # Every use goes through these (and Context's): see `_unfreed`.
    @property
    def ptr(self) -> Any:
        return _unfreed(self._ptr, self._ptr)

    @property
    def vocab(self) -> Any:
        return _unfreed(self._ptr, self._vocab)

    @property
    def closed(self) -> bool:
        return not self._ptr

    def close(self) -> None:
        with self._lock.exclusive():
            self._stack.close()

    def on_close(self, callback) -> None:  # type: ignore[no-untyped-def]
        self._stack.callback(callback)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool, most: int | None = None) -> list[int]:
        """`most`: refuse (ContextOverflowError) a text of more tokens, as soon as a piece of it shows that."""
        if not isinstance(text, str):
            raise UsageError(f"text to tokenize must be a str, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8, decoded with surrogateescape
            raise UsageError(f"the text is not valid Unicode ({exc.object[exc.start:exc.end]!r} at character "
                             f"{exc.start})") from None
        cuts = self._cuts(data, parse_special, add_special)
        tokens: list[int] = []
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            tokens += self._tokenize(data[start:end], add_special=add_special and start == 0,
                                     parse_special=parse_special)
            if most is not None and len(tokens) > most:
                raise ContextOverflowError(f"the text is longer than {most} tokens ({len(tokens)} in its first "
                                           f"{end} of {len(data)} bytes)")
        return tokens

    def _tokenize(self, data: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        capacity = len(data) + 16
        buf = (ll.llama_token * capacity)()
        with self._lock.shared():
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n < 0:
                capacity = -n
                buf = (ll.llama_token * capacity)()
                n = ll.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            raise EngineError("tokenization failed")
        return list(buf[:n])

    def _cuts(self, data: bytes, parse_special: bool, add_special: bool) -> list[int]:
        """Where a long text is cut into pieces tokenized one by one (edge_adapt.engine.special_cuts)."""
        if len(data) <= CUT_ABOVE_BYTES or not self._pieces_apart or (add_special and self._adds_eos):
            return []
        return safe_cuts(data, self._special_tokens(parse_special), SPECIALS_PER_PIECE)

    def _special_tokens(self, parse_special: bool) -> list[Special]:
        """The tokens llama.cpp looks for in a text before tokenizing it: control, user-defined and unknown ones,
        only the user-defined ones when special tokens are not parsed."""
        found = self._specials.get(parse_special)
        if found is None:
            kinds = ll.LLAMA_TOKEN_ATTR_USER_DEFINED
            if parse_special:
                kinds |= ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN
            found = []
            with self._lock.shared():
                for token in range(self.n_vocab):
                    attr = ll.llama_vocab_get_attr(self.vocab, token)
                    if attr & kinds:
                        found.append(Special(ll.llama_vocab_get_text(self.vocab, token) or b"",
                                             bool(attr & ll.LLAMA_TOKEN_ATTR_RSTRIP)))
            self._specials[parse_special] = found
        return found

    @functools.cached_property
    def control_texts(self) -> list[str]:
        """The texts llama.cpp reads as a control token only when asked to parse special tokens (`<|im_end|>`):
        in a chat message's content they are plain characters (TextModel.chat_tokens; a property, as every
        conversation's tokenizing reads it)."""
        always = {sp.text for sp in self._special_tokens(False)}
        return [sp.text.decode("utf-8", "replace") for sp in self._special_tokens(True)
                if sp.text and sp.text not in always]

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for, without rendering control tokens (cached: the hot loop calls this)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            with self._lock.shared():
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation (cached like `piece`: a call into llama.cpp costs microseconds)."""
        eog = self._eog.get(token)
        if eog is None:
            with self._lock.shared():
                eog = self._eog[token] = bool(ll.llama_vocab_is_eog(self.vocab, token))
        return eog

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        with self._lock.shared():
            n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        with self._lock.shared():
            tpl = ll.llama_model_chat_template(self.ptr, None)
        return tpl.decode("utf-8", "replace") if tpl else None


class Adapter:
    """A LoRA or activated-LoRA adapter loaded on top of a model; freed before the model."""

    def __init__(self, model: Model, path: Path) -> None:
        ptr = ll.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise ModelFileError(f"{path}: llama.cpp could not load this adapter for this model")
        self.ptr = ptr
        self.path = path
        n = ll.llama_adapter_get_alora_n_invocation_tokens(ptr)
        toks = ll.llama_adapter_get_alora_invocation_tokens(ptr)
        self.invocation_tokens: list[int] = [toks[i] for i in range(n)] if n else []
        model.on_close(self.close)

    def close(self) -> None:
        if self.ptr:
            ll.llama_adapter_lora_free(self.ptr)
            self.ptr = None


class AbortFlag:
    """A flag for llama.cpp's abort callback that it reads without entering Python.

    llama.cpp calls the callback between graph nodes, hundreds of times a decode. A Python callback takes the
    GIL at each call, and waits for it while another thread holds it (the log-probabilities' workers beside a
    decode): on a model whose decode takes a millisecond that cost a fifth of a single stream's speed. The
    callback here is the C library's `strlen` over a two-byte buffer, so the flag is its first byte: 0 reads as
    false, 1 as true (a bool is returned in the low byte of the register `strlen`'s size_t comes back in, on
    every ABI llama.cpp runs on). Where no C library can be found, a Python callback reads the same byte.
    """

    def __init__(self) -> None:
        self._buffer = ctypes.create_string_buffer(2)  # b"\0\0": strlen 0, not aborting
        self.data = ctypes.cast(self._buffer, ctypes.c_void_p)
        strlen = _c_strlen()
        if strlen is not None:
            self.callback = ll.ggml_abort_callback(ctypes.cast(strlen, ctypes.c_void_p).value)
        else:
            self.callback = ll.ggml_abort_callback(lambda _: self._buffer.raw[0] != 0)

    def set(self, flag: bool = True) -> None:
        self._buffer[0] = b"\x01" if flag else b"\x00"

    def is_set(self) -> bool:
        return self._buffer.raw[0] != 0


@functools.cache
def _c_strlen() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        return libc.strlen
    except (OSError, AttributeError):
        return None


class Context:
    """A llama_context: KV memory for up to n_seq_max sequences, decoding, per-sequence state."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        kv_unified: bool,
        offload_kqv: bool,
    ) -> None:
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        # We read at most one row of logits per sequence per decode (sampling, prompt end, self-eval suffix
        # end); without this bound llama.cpp reserves logits for a whole batch (n_batch x n_vocab floats,
        # 96 MiB for a 49k vocabulary), which is most of a small model's compute buffer.
        params.n_outputs_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = kv_unified
        params.offload_kqv = offload_kqv
        params.no_perf = True
        # llama.cpp polls this between graph nodes, so another thread can cancel a long decode.
        self._abort = AbortFlag()
        params.abort_callback, params.abort_callback_data = self._abort.callback, self._abort.data
        ptr = ll.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise EngineError("llama.cpp could not create a context (out of memory? run with --verbose)")
        self._ptr = ptr
        self._lock = threading.Lock()  # see _unfreed
        self.model = model
        self.n_vocab = model.n_vocab
        self.n_ctx = ll.llama_n_ctx(ptr)
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = ll.llama_n_ctx_seq(ptr) if hasattr(ll, "llama_n_ctx_seq") else self.n_ctx
        self.n_batch = ll.llama_n_batch(ptr)  # llama.cpp caps it at the n_ctx asked for (--ctx 64: 64)
        self._memory = ll.llama_get_memory(ptr)
        self._stack = ExitStack()
        self._stack.callback(self._free)
        self._adapters: tuple[int, ...] = ()
        # With a KV stream per sequence, llama.cpp copies a stream for `seq_cp` at the next decode, and reading a
        # sequence's state does not wait for it: the engine decodes before such a read while this is set.
        self._split = not kv_unified and n_seq_max > 1
        self.copies_pending = False
        model.on_close(self.close)

    def _free(self) -> None:
        with self._lock:
            if self._ptr:
                ll.llama_free(self._ptr)
                self._ptr = None

    @property
    def ptr(self) -> Any:
        return _unfreed(self._ptr, self._ptr)

    @property
    def memory(self) -> Any:
        return _unfreed(self._ptr, self._memory)

    @property
    def closed(self) -> bool:
        return not self._ptr

    def close(self) -> None:
        self._stack.close()

    def request_abort(self, flag: bool = True) -> None:
        self._abort.set(flag)

    def decode(self, batch: Batch) -> None:
        with self._lock:
            rc = ll.llama_decode(self.ptr, batch.view)
        if rc >= 0:  # past its input checks llama.cpp has applied the pending stream copies
            self.copies_pending = False
        if rc == 2:
            from edge_adapt.engine.events import Cancelled

            raise Cancelled()
        if rc == 1:
            raise EngineError("no room left in the KV cache for this batch")
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")

    def logits_view(self, n_outputs: int) -> np.ndarray:
        """Logits of the last decode's outputs, (n_outputs, n_vocab) in batch order, where llama.cpp wrote them:
        its own buffer, which the next decode overwrites (and may reallocate). Read or copy them before that."""
        with self._lock:
            ptr = ll.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def seq_cp(self, src: int, dst: int) -> None:
        with self._lock:
            ll.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.copies_pending = self.copies_pending or (self._split and src != dst)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        with self._lock:
            removed = ll.llama_memory_seq_rm(self.memory, seq, p0, p1)
        if not removed:
            raise EngineError(f"could not remove positions [{p0}, {p1}) of sequence {seq}")

    def seq_pos_max(self, seq: int) -> int:
        with self._lock:
            return ll.llama_memory_seq_pos_max(self.memory, seq)

    def state_seq_get(self, seq: int) -> bytes:
        with self._lock:
            size = ll.llama_state_seq_get_size(self.ptr, seq)
            buf = (ctypes.c_uint8 * size)()
            written = ll.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if written != size:
            raise EngineError(f"sequence {seq} state: expected {size} bytes, got {written}")
        return bytes(buf)

    def state_seq_set(self, seq: int, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        with self._lock:
            accepted = ll.llama_state_seq_set_data(self.ptr, buf, len(data), seq)
        if accepted == 0:
            raise EngineError("llama.cpp refused the sequence state (taken from another model or context size?)")

    def set_adapters(self, adapters: list[Adapter], scales: list[float]) -> None:
        key = tuple(a.ptr for a in adapters)
        if key == self._adapters:
            return
        arr = (ll.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(*[a.ptr for a in adapters])
        sc = (ctypes.c_float * max(1, len(adapters)))(*scales)
        with self._lock:
            refused = ll.llama_set_adapters_lora(self.ptr, arr if adapters else None, len(adapters), sc if adapters else None)
        if refused:
            raise EngineError("llama.cpp refused the adapter set")
        self._adapters = key


class Batch:
    """A reusable llama_batch whose token, position and flag arrays are filled through numpy views."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.view = ll.llama_batch_init(capacity, 0, 1)
        self._stack = ExitStack()
        self._stack.callback(self._free)
        self._token = np.ctypeslib.as_array(self.view.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self.view.pos, shape=(capacity,))
        self._n_seq = np.ctypeslib.as_array(self.view.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.view.logits, shape=(capacity,))
        self._n_seq[:] = 1

    def _free(self) -> None:
        if self.view is not None:
            ll.llama_batch_free(self.view)
            self.view = None

    def close(self) -> None:
        self._stack.close()

    def fill(self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray, want_logits: np.ndarray) -> None:
        n = len(tokens)
        if n > self.capacity:
            raise EngineError(f"batch of {n} tokens exceeds capacity {self.capacity}")
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._logits[:n] = want_logits
        seq_ptrs = self.view.seq_id
        for i, s in enumerate(seq_ids.tolist()):
            seq_ptrs[i][0] = s
        self.view.n_tokens = n
