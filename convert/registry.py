"""One small class per architecture family, registered under the HF architecture names it converts.

A class knows four things about its family: which HF tensor becomes which GGUF tensor, how a tensor's
layout differs between the two (`modify_tensors` / `restore_tensor`), which hyperparameters llama.cpp
reads (`set_gguf_parameters`), and the reverse (`hf_config`) for importing a GGUF back to transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import gguf
import numpy as np

from edge_adapt.errors import ModelFileError, is_number, is_whole

_REGISTRY: dict[str, type[ModelBase]] = {}
_BY_GGUF_ARCH: dict[str, type[ModelBase]] = {}

M = TypeVar("M", bound="type[ModelBase]")


def register(*hf_names: str) -> Callable[[M], M]:
    def wrap(cls: M) -> M:
        for name in hf_names:
            _REGISTRY[name] = cls
        _BY_GGUF_ARCH.setdefault(cls.gguf_arch, cls)
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(config: dict[str, Any]) -> type[ModelBase]:
    """The class for a config.json's `architectures`; an unknown one is named along with what is supported."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):  # one class name, not the list transformers writes: read as that one name
        archs = [archs]
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelFileError(f"config.json: architectures must be a list of class names, got {archs!r:.60}")
    if not archs:
        raise ModelFileError("config.json has no `architectures` entry; cannot tell which model this is")
    for name in archs:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ModelFileError(
        f"unsupported architecture {archs[0]!r}; supported: {', '.join(supported_architectures())}"
    )


def model_class_for_gguf(arch: str) -> type[ModelBase]:
    if arch not in _BY_GGUF_ARCH:
        raise ModelFileError(f"cannot import GGUF architecture {arch!r}; supported: {', '.join(sorted(_BY_GGUF_ARCH))}")
    return _BY_GGUF_ARCH[arch]


@dataclass(frozen=True)
class Hparams:
    """The hyperparameters the llama-like families share, read from config.json (transformers 4 or 5)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    rope_scaling: dict[str, Any] | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Hparams:
        try:
            n_embd = int(cfg["hidden_size"])
            n_head = int(cfg["num_attention_heads"])
            # transformers 5 moved rope settings into `rope_parameters`; 4.x keeps `rope_theta`/`rope_scaling`.
            rope = cfg.get("rope_parameters") or {}
            scaling = _rope_scaling(cfg)

            def given(d: dict[str, Any], key: str, default: Any) -> Any:
                """A missing or null entry is the default; any other value (0 too) is the value, to be checked."""
                value = d.get(key) if isinstance(d, dict) else None
                return default if value is None else value

            return cls(
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(given(cfg, "num_key_value_heads", n_head)),
                head_dim=int(given(cfg, "head_dim", n_embd // n_head if n_head else 0)),
                n_vocab=int(cfg["vocab_size"]),
                n_ctx=int(given(cfg, "max_position_embeddings", 2048)),
                rope_theta=float(given(cfg, "rope_theta", given(rope, "rope_theta", 10000.0))),
                rms_eps=float(given(cfg, "rms_norm_eps", 1e-6)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_scaling=scaling,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"config.json lacks or has a bad hyperparameter: {exc}") from None

    def __post_init__(self) -> None:
        """Values llama.cpp would assert on (or allocate from) are refused here, before anything is written."""
        counts = {"num_hidden_layers": self.n_layer, "hidden_size": self.n_embd, "intermediate_size": self.n_ff,
                  "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv,
                  "head_dim": self.head_dim, "vocab_size": self.n_vocab, "max_position_embeddings": self.n_ctx}
        for key, v in counts.items():
            if not 0 < v < 1 << 24:
                raise ModelFileError(f"config.json: {key} is {v}")
        if self.n_layer > 512:
            raise ModelFileError(f"config.json: num_hidden_layers is {self.n_layer}; llama.cpp takes at most 512")
        if self.n_head % self.n_head_kv:
            raise ModelFileError(f"config.json: {self.n_head} attention heads are not a multiple of "
                                 f"{self.n_head_kv} key/value heads")
        if self.head_dim % 2:
            raise ModelFileError(f"config.json: head size {self.head_dim} is odd (rope rotates pairs)")
        if not (math.isfinite(self.rms_eps) and 0 < self.rms_eps < 1):
            raise ModelFileError(f"config.json: rms_norm_eps is {self.rms_eps}; expected a small positive number")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ModelFileError(f"config.json: rope_theta is {self.rope_theta}; expected a positive number")


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling a config asks for, its type under `rope_type`; None for none. transformers 4 spells it
    `rope_scaling`, 5 `rope_parameters`, and both read type "default" as no scaling. Values the scaling divides
    by are checked here, so a bad one is named rather than failing the arithmetic later."""
    for key in ("rope_scaling", "rope_parameters"):
        sc = cfg.get(key)
        if sc is None:
            continue
        if not isinstance(sc, dict):
            raise ModelFileError(f"config.json: {key} must be an object, got {sc!r:.40}")
        kind = sc.get("rope_type") or sc.get("type") or "default"
        if kind == "default":
            continue
        defaults: dict[str, float | None] = {"factor": None}
        if kind == "llama3":
            defaults = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
        for field, default in defaults.items():
            value = sc.get(field, default)
            if not (is_number(value) and math.isfinite(value) and value > 0):
                raise ModelFileError(f"config.json: {key}.{field} must be a positive number for {kind} rope scaling, "
                                     f"got {value!r:.40}")
        if kind == "llama3" and sc.get("high_freq_factor", 4.0) <= sc.get("low_freq_factor", 1.0):
            raise ModelFileError(f"config.json: {key}.high_freq_factor must exceed low_freq_factor")
        return {**sc, "rope_type": kind}
    return None


class ModelBase:
    """Shared machinery; subclasses set the class variables and override the hooks they need."""

    gguf_arch: ClassVar[str]
    hf_architecture: ClassVar[str]  # what `import` writes into config.json
    hf_model_type: ClassVar[str]
    # HF names inside a decoder layer (`model.layers.{bid}.`) -> GGUF names inside a block (`blk.{bid}.`).
    layer_tensors: ClassVar[dict[str, str]] = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    optional_layer_tensors: ClassVar[dict[str, str]] = {}
    global_tensors: ClassVar[dict[str, str]] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    # Buffers some checkpoints carry that llama.cpp recomputes.
    ignored: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    rope_scaling_types: ClassVar[tuple[str, ...]] = ("linear",)

    def __init__(self, config: dict[str, Any]) -> None:
        if type(self) is ModelBase:
            raise TypeError("ModelBase is abstract; use a registered architecture class")
        self.config = config
        self.hp = Hparams.from_config(config)
        self.check_supported()
        self._to_gguf = self._name_table()
        self._to_hf = {v: k for k, v in self._to_gguf.items()}

    # -- names ------------------------------------------------------------------------------------------
    def _name_table(self) -> dict[str, str]:
        table = dict(self.global_tensors)
        for bid in range(self.hp.n_layer):
            for hf, gg in {**self.layer_tensors, **self.optional_layer_tensors}.items():
                table[f"model.layers.{bid}.{hf}"] = f"blk.{bid}.{gg}"
        return table

    def required_tensors(self) -> list[str]:
        names = [n for n in self.global_tensors if not (n == "lm_head.weight" and self.hp.tie_embeddings)]
        for bid in range(self.hp.n_layer):
            names += [f"model.layers.{bid}.{hf}" for hf in self.layer_tensors]
        return names

    def is_ignored(self, hf_name: str) -> bool:
        return hf_name.endswith(self.ignored) or (hf_name == "lm_head.weight" and self.hp.tie_embeddings)

    def expected_shape(self, hf_name: str) -> tuple[int, ...] | None:
        """The shape (transformers' order) the hyperparameters imply for a checkpoint tensor; None: not known."""
        hp = self.hp
        q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        shapes = {
            "model.embed_tokens.weight": (hp.n_vocab, hp.n_embd), "lm_head.weight": (hp.n_vocab, hp.n_embd),
            "model.norm.weight": (hp.n_embd,), "input_layernorm.weight": (hp.n_embd,),
            "post_attention_layernorm.weight": (hp.n_embd,), "self_attn.q_proj.weight": (q, hp.n_embd),
            "self_attn.k_proj.weight": (kv, hp.n_embd), "self_attn.v_proj.weight": (kv, hp.n_embd),
            "self_attn.o_proj.weight": (hp.n_embd, q), "mlp.gate_proj.weight": (hp.n_ff, hp.n_embd),
            "mlp.up_proj.weight": (hp.n_ff, hp.n_embd), "mlp.down_proj.weight": (hp.n_embd, hp.n_ff),
            "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.bias": (hp.n_embd,), "mlp.gate_proj.bias": (hp.n_ff,), "mlp.up_proj.bias": (hp.n_ff,),
            "mlp.down_proj.bias": (hp.n_embd,),
        }
        if hf_name.startswith("model.layers."):
            hf_name = hf_name.split(".", 3)[3]
        return shapes.get(hf_name)

    def gguf_name(self, hf_name: str) -> str:
        try:
            return self._to_gguf[hf_name]
        except KeyError:
            raise ModelFileError(f"unexpected tensor {hf_name!r} for {self.hf_architecture}") from None

    def hf_name(self, gguf_name: str) -> str:
        try:
            return self._to_hf[gguf_name]
        except KeyError:
            raise ModelFileError(f"unexpected GGUF tensor {gguf_name!r} for {self.gguf_arch}") from None

    @staticmethod
    def block_id(gguf_name: str) -> int | None:
        m = re.match(r"blk\.(\d+)\.", gguf_name)
        return int(m.group(1)) if m else None

    # -- hooks ------------------------------------------------------------------------------------------
    def check_supported(self) -> None:
        """Refuse, before anything is written, settings llama.cpp's graph for this family would not honour
        (it would load the file and compute different logits, or not load it at all)."""
        act = self.config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' two names for the same function
            raise ModelFileError(f"config.json: hidden_act {act!r} is not supported (llama.cpp's {self.gguf_arch} "
                                 "graph always uses SiLU)")
        sc = self.hp.rope_scaling
        if sc and sc["rope_type"] not in self.rope_scaling_types:
            raise ModelFileError(f"config.json: {sc['rope_type']} rope scaling is not supported for "
                                 f"{self.hf_architecture} (supported: {', '.join(self.rope_scaling_types)})")

    def set_gguf_parameters(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_vocab_size(hp.n_vocab)
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim != hp.n_embd // hp.n_head:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        self._set_rope_scaling(w)

    def _set_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        sc = self.hp.rope_scaling
        if sc and sc["rope_type"] == "linear":  # llama3 is carried by the rope_freqs tensor (extra_tensors)
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(sc["factor"]))

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not hold."""
        return iter(())

    def modify_tensors(self, data: Any, name: str, bid: int | None) -> Iterator[tuple[str, Any]]:
        """HF layout -> GGUF layout for one tensor (torch or numpy; also called on meta tensors to plan)."""
        yield name, data

    def restore_tensor(self, data: np.ndarray, name: str) -> np.ndarray:
        """GGUF layout -> HF layout: the inverse of modify_tensors."""
        return data

    # -- import direction ---------------------------------------------------------------------------------
    @classmethod
    def hf_config(cls, kv: dict[str, Any], n_vocab: int, tensor_names: Collection[str]) -> dict[str, Any]:
        """config.json for a GGUF of this family, from its metadata and which tensors it holds."""
        a = cls.gguf_arch
        tied = "output.weight" not in tensor_names
        n_embd, n_head = int(kv[f"{a}.embedding_length"]), int(kv[f"{a}.attention.head_count"])
        theta = float(kv.get(f"{a}.rope.freq_base", 10000.0))
        cfg: dict[str, Any] = {
            "architectures": [cls.hf_architecture],
            "model_type": cls.hf_model_type,
            "hidden_size": n_embd,
            "intermediate_size": int(kv[f"{a}.feed_forward_length"]),
            "num_hidden_layers": int(kv[f"{a}.block_count"]),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(kv.get(f"{a}.attention.head_count_kv", n_head)),
            "head_dim": int(kv.get(f"{a}.attention.key_length", n_embd // n_head)),
            "max_position_embeddings": int(kv.get(f"{a}.context_length", 2048)),
            "rms_norm_eps": float(kv.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "vocab_size": n_vocab,
            "hidden_act": "silu",
            "tie_word_embeddings": tied,
            # Both spellings: transformers 4 reads rope_theta, 5 reads rope_parameters.
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "torch_dtype": "float32",
        }
        if kv.get(f"{a}.rope.scaling.type") == "linear":
            factor = float(kv[f"{a}.rope.scaling.factor"])
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
            cfg["rope_parameters"] = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        for key, tok in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            if f"tokenizer.ggml.{tok}_token_id" in kv:
                cfg[key] = int(kv[f"tokenizer.ggml.{tok}_token_id"])
        return cfg


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved pairs (works on torch and numpy)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: Any, n_head: int) -> Any:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaModel(ModelBase):
    """Llama, SmolLM, Mistral-style: llama.cpp rotates interleaved pairs, so Q and K rows are permuted."""

    gguf_arch = "llama"
    hf_architecture = "LlamaForCausalLM"
    hf_model_type = "llama"
    rope_scaling_types = ("linear", "llama3")  # llama3: the rope_freqs tensor (extra_tensors), read by the llama graph
    optional_layer_tensors = {
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.bias": "attn_output.bias",
        "mlp.gate_proj.bias": "ffn_gate.bias",
        "mlp.up_proj.bias": "ffn_up.bias",
        "mlp.down_proj.bias": "ffn_down.bias",
    }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        window = config.get("sliding_window")  # Mistral's
        if window is not None:
            if not is_whole(window) or window < 1:
                raise ModelFileError(f"config.json: sliding_window must be a whole number >= 1, got {window!r:.40}")
            # llama.cpp's llama graph attends to every earlier token, which is Mistral's sliding-window attention
            # exactly as long as the sequence fits in the window; so the file says it was trained for no more
            # than the window (the engine refuses a longer context).
            self.hp = replace(self.hp, n_ctx=min(self.hp.n_ctx, window))

    @classmethod
    def hf_config(cls, kv: dict[str, Any], n_vocab: int, tensor_names: Collection[str]) -> dict[str, Any]:
        cfg = super().hf_config(kv, n_vocab, tensor_names)
        # transformers' Llama has biases on every attention projection or on none (attention_bias), and likewise
        # on the MLP's (mlp_bias).
        for key, kinds in (("attention_bias", ("attn_q", "attn_k", "attn_v", "attn_output")),
                           ("mlp_bias", ("ffn_gate", "ffn_up", "ffn_down"))):
            biases = {f"blk.{bid}.{kind}.bias" for bid in range(cfg["num_hidden_layers"]) for kind in kinds}
            present = biases & set(tensor_names)
            if present and present != biases:
                raise ModelFileError(f"{len(present)} of the {len(biases)} {', '.join(kinds)} bias tensors present "
                                     f"(first missing: {min(biases - present)}); transformers' Llama ({key}) has "
                                     "them on every projection or on none")
            cfg[key] = bool(present)
        return cfg

    def _heads_for(self, name: str) -> int | None:
        if ".attn_q." in name:
            return self.hp.n_head
        if ".attn_k." in name:
            return self.hp.n_head_kv
        return None

    def modify_tensors(self, data: Any, name: str, bid: int | None) -> Iterator[tuple[str, Any]]:
        heads = self._heads_for(name)
        yield name, (_permute(data, heads) if heads else data)

    def restore_tensor(self, data: np.ndarray, name: str) -> np.ndarray:
        heads = self._heads_for(name)
        return _unpermute(data, heads) if heads else data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        sc = self.hp.rope_scaling
        if not sc or sc["rope_type"] != "llama3":
            return
        # Llama 3.1 frequency-dependent scaling, precomputed per rotary pair as llama.cpp expects.
        factor = float(sc.get("factor", 8.0))
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        dim = self.hp.head_dim
        freqs = 1.0 / (self.hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        factors = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                factors.append(1.0)
            elif wavelen > old_ctx / low:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        yield "rope_freqs.weight", np.asarray(factors, dtype=np.float32)


@register("Qwen2ForCausalLM")
class Qwen2Model(ModelBase):
    """Qwen2: NEOX-style rope (no permutation) and biases on Q, K and V."""

    gguf_arch = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    hf_model_type = "qwen2"
    layer_tensors = {
        **ModelBase.layer_tensors,
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
    }

    def check_supported(self) -> None:
        super().check_supported()
        hp = self.hp
        if self.config.get("use_sliding_window"):
            raise ModelFileError("Qwen2 with use_sliding_window=true is not supported by llama.cpp's qwen2 graph")
        if hp.n_head * hp.head_dim != hp.n_embd:
            # llama.cpp's qwen2 graph sizes the Q and output projections by hidden_size, not heads x head_dim.
            raise ModelFileError(f"config.json: head_dim {hp.head_dim} x {hp.n_head} heads differs from hidden_size "
                                 f"{hp.n_embd}, which llama.cpp's qwen2 graph does not support")
