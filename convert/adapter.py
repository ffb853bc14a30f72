"""PEFT LoRA / activated LoRA: read an adapter directory, merge it into weights, export it as a GGUF adapter,
or import a GGUF adapter back into a PEFT directory (to train a shipped adapter further).

llama.cpp applies `scale * B @ A` with scale = alpha / rank, where rank is read from each tensor; so PEFT's
rsLoRA (alpha / sqrt(rank)) is written as an equivalent alpha. Q/K rows are permuted for llama like the base
weight, which only touches B (A acts on the input side).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from edge_adapt.fileio import atomic_dir, atomic_file, check_not_input, check_replaceable, check_target
from edge_adapt.convert.checkpoint import present, read_json, require_torch
from edge_adapt.convert.gguf_io import read_gguf_kv
from edge_adapt.progress import Job, Progress, to_the_end
from edge_adapt.convert.registry import ModelBase, model_class_for_gguf
from edge_adapt.errors import ModelFileError, UsageError, is_number, is_whole

if TYPE_CHECKING:
    import torch

    from edge_adapt.engine.gguf_file import GGUFInfo

_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """One PEFT adapter: per target weight (HF name) its A (r, in) and B (out, r), and the shared scale."""

    path: Path
    rank: int
    alpha: float
    scale: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    invocation_tokens: list[int] | None

    @property
    def gguf_alpha(self) -> float:
        """The alpha llama.cpp needs so that alpha / rank equals PEFT's scale, as the float32 the GGUF holds. There is
        none for scale 0: llama.cpp reads alpha 0 as "no alpha" and applies the adapter at full strength."""
        with np.errstate(over="ignore"):
            alpha = float(np.float32(self.scale * self.rank))
        where = self.path / "adapter_config.json"
        if alpha == 0:
            raise ModelFileError(f"{where}: lora_alpha {self.alpha:g} makes the adapter change nothing (PEFT scale 0), "
                                 "which a GGUF adapter cannot hold: llama.cpp reads alpha 0 as full strength")
        if not math.isfinite(alpha):
            raise ModelFileError(f"{where}: lora_alpha {self.alpha:g} is beyond the float32 alpha of a GGUF adapter")
        return alpha

    def delta(self, hf_name: str) -> torch.Tensor | None:
        if hf_name not in self.pairs:
            return None
        a, b = self.pairs[hf_name]
        return (b @ a) * self.scale


def load_peft_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read adapter_config.json and adapter_model.safetensors; refuse what llama.cpp cannot apply."""
    torch = require_torch()
    root = Path(path)
    if root.is_file():
        with root.open("rb") as fh:
            gguf_file = fh.read(4) == b"GGUF"
        raise ModelFileError(f"{root}: {'a GGUF adapter file' if gguf_file else 'a file'}, not a PEFT adapter "
                             "directory (adapter_config.json, adapter_model.safetensors)")
    if not root.is_dir():
        raise ModelFileError(f"{root}: no such adapter directory")
    cfg = read_json(root / "adapter_config.json", "PEFT adapter config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFileError(f"{root}: PEFT type {cfg.get('peft_type')!r} is not LoRA")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "full modules_to_save"), ("alpha_pattern", "alpha_pattern"),
                     ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise ModelFileError(f"{root}: {why} adapters cannot be converted for llama.cpp")
    where = root / "adapter_config.json"
    rank, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ModelFileError(f"{where}: rank_pattern must be an object")
    for field, value in (("r", rank), *((f"rank_pattern.{k}", v) for k, v in pattern.items())):
        if not is_whole(value) or value < 1:
            raise ModelFileError(f"{where}: {field} must be a whole number >= 1, got {value!r:.40}")
    if not (is_number(alpha) and math.isfinite(alpha)):
        raise ModelFileError(f"{where}: lora_alpha must be a number, got {alpha!r:.40}")
    ranks = {rank, *pattern.values()}
    if cfg.get("use_rslora") and len(ranks) > 1:
        raise ModelFileError(f"{root}: rsLoRA with a rank_pattern has no single llama.cpp alpha")
    if len(ranks) > 1:
        raise ModelFileError(f"{root}: rank_pattern (mixed ranks) is not supported")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    invocation = cfg.get("alora_invocation_tokens")
    if invocation is not None and not (isinstance(invocation, list)
                                       and all(is_whole(t) and t >= 0 for t in invocation)):
        raise ModelFileError(f"{where}: alora_invocation_tokens must be a list of token ids, got {invocation!r:.40}")

    weights = root / "adapter_model.safetensors"
    try:
        if present(weights):
            from safetensors.torch import load_file

            state = load_file(str(weights))
        elif present(root / "adapter_model.bin"):
            state = torch.load(root / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ModelFileError(f"{root}: adapter weights missing (adapter_model.safetensors)")
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{root}: unreadable adapter weights ({exc.__class__.__name__})") from None

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                halves.setdefault(name[: -len(marker)] + ".weight", {})[part] = value.to(torch.float32)
                break
        else:
            if name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers: a full copy of the layer
                raise ModelFileError(
                    f"{root}: the adapter holds a full copy of {name.removesuffix('.base_layer.weight')} ({key}), "
                    "which a llama.cpp adapter cannot carry; if training did not change that layer, save the adapter "
                    "again with save_pretrained(..., save_embedding_layers=False)"
                )
            raise ModelFileError(f"{root}: unsupported adapter tensor {key!r} (only lora_A / lora_B of linear layers)")
    pairs = {}
    for name, h in halves.items():
        if set(h) != {"lora_A", "lora_B"}:
            raise ModelFileError(f"{root}: incomplete adapter, {name} lacks lora_A or lora_B")
        a, b = h["lora_A"], h["lora_B"]
        _check_halves(root, name, a, b, ("lora_A", "lora_B"))
        # The scale is alpha / r from the config, and llama.cpp divides alpha by each tensor's own rank: a tensor of
        # another rank would be applied at another strength than PEFT's (r 16 on rank-8 tensors: twice).
        if a.shape[0] != rank:
            said = "rank_pattern gives" if any(_matches(name, k) for k in pattern) else "r is"
            raise ModelFileError(f"{root}: {name} has rank {a.shape[0]} (lora_A is {a.shape[0]}x{a.shape[1]}), but "
                                 f"adapter_config.json's {said} {rank}")
        pairs[name] = (a, b)
    if not pairs:
        raise ModelFileError(f"{root}: adapter holds no LoRA tensors")
    return LoraAdapter(root, rank, float(alpha), scale, pairs, invocation or None)


def _matches(name: str, key: str) -> bool:
    """Whether a rank_pattern key names this weight (PEFT matches a key against the end of the module name)."""
    module = name.removesuffix(".weight")
    return module == key or module.endswith("." + key)


def _check_halves(where: Path, name: str, a: torch.Tensor, b: torch.Tensor, parts: tuple[str, str]) -> None:
    """A LoRA pair is two matrices, A (rank, in) and B (out, rank), of one rank: anything else is a broken
    adapter file, whatever base it is meant for."""
    for part, t in zip(parts, (a, b)):
        if t.ndim != 2:
            raise ModelFileError(f"{where}: {name} {part} has shape {list(t.shape)}; a LoRA half is a 2-D matrix")
    if a.shape[0] != b.shape[1]:
        raise ModelFileError(f"{where}: {name} {parts[0]} has rank {a.shape[0]} ({a.shape[0]}x{a.shape[1]}), "
                             f"{parts[1]} rank {b.shape[1]} ({b.shape[0]}x{b.shape[1]})")


def check_fits(adapter: LoraAdapter, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every target must exist in the base with B @ A's shape; otherwise it was trained on another model. `shapes`:
    the weights the base has of its own (a tied lm_head is the embeddings, not a weight of its own)."""
    for name, (a, b) in adapter.pairs.items():
        if name not in shapes:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in shapes:
                # llama.cpp reads a tied head from token_embd, where a LoRA would change the embeddings too.
                raise ModelFileError(f"adapter {adapter.path} targets lm_head, which {what} ties to the token "
                                     "embeddings; the converter cannot map a LoRA on a tied output head (train "
                                     "without lm_head in target_modules)")
            raise ModelFileError(f"adapter {adapter.path} targets {name}, which {what} does not have (different base?)")
        want = tuple(shapes[name])
        got = (b.shape[0], a.shape[1])
        if want != got or a.shape[0] != b.shape[1]:
            raise ModelFileError(
                f"adapter {adapter.path} does not fit {what}: {name} is {want[0]}x{want[1]} in the base, "
                f"{got[0]}x{got[1]} in the adapter (different base model?)"
            )


def _base_layout(info: GGUFInfo) -> tuple[ModelBase, dict[str, tuple[int, ...]]]:
    """The architecture class of a base GGUF (names and Q/K layout) and its weights' shapes by HF name."""
    reader = gguf.GGUFReader(info.path)
    kv = read_gguf_kv(reader, skip_vocab=True)
    cls = model_class_for_gguf(info.architecture)
    model: ModelBase = cls(cls.hf_config(kv, info.n_vocab, {t.name for t in reader.tensors}))
    shapes = {model.hf_name(t.name): tuple(int(x) for x in reversed(t.shape))
              for t in reader.tensors if t.name != "rope_freqs.weight"}
    return model, shapes


@dataclass(frozen=True)
class AdapterResult:
    path: Path
    n_tensors: int
    alpha: float
    invocation_tokens: list[int] | None
    seconds: float


def convert_adapter_job(
    peft_dir: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    self_eval_config: str | os.PathLike[str] | dict[str, Any] | None = None,
    type: str = "f32",
    name: str | None = None,
    force: bool = False,
) -> Job[AdapterResult]:
    """Export a PEFT LoRA or aLoRA as a GGUF adapter that llama.cpp loads on top of the `base` GGUF.

    `self_eval_config` (a dict or a JSON file) is written as `edge_adapt.self_eval.*` metadata, so the runtime
    scores with the suffix and answers the adapter was trained on, with no flags. `type` f16 halves the file but is
    not free: llama.cpp multiplies an f16 adapter's tensors at f16 precision (on the CPU the activations are rounded
    to f16 too), so outputs and self-eval scores differ slightly from the f32 file's even where the values are the
    same (the shipped f16 adapter, exported as f32, scores a reply 0.1048 where the f16 file scores 0.0988). To
    reproduce an f16 adapter exactly, export it as f16. `name`: its title (`general.name`), the PEFT directory's
    name if None. As a job it yields Progress ("adapter", per tensor written); `convert_adapter` runs it to its
    result."""
    if type not in ("f32", "f16"):
        raise UsageError(f"adapter type must be f32 or f16, got {type!r}")
    dtype = np.float32 if type == "f32" else np.float16
    from edge_adapt.convert.model import check_adapter_loadable, check_f16_range, read_self_eval_config, write_self_eval
    from edge_adapt.engine.gguf_file import inspect_gguf

    t0 = time.perf_counter()
    out_path = Path(out)
    check_not_input(out_path, (peft_dir, base, None if isinstance(self_eval_config, dict) else self_eval_config))
    check_target(out_path, force=force)
    self_eval = read_self_eval_config(self_eval_config)
    info = inspect_gguf(base, expect="model")
    adapter = load_peft_adapter(peft_dir)
    model, hf_shapes = _base_layout(info)
    check_fits(adapter, hf_shapes, f"base model {info.path.name}")

    w = gguf.GGUFWriter(None, info.architecture)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name or adapter.path.name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.gguf_alpha)
    if adapter.invocation_tokens:
        n_vocab = info.n_vocab
        bad = [t for t in adapter.invocation_tokens if not 0 <= t < n_vocab]
        if bad:
            raise ModelFileError(f"aLoRA invocation token {bad[0]} is outside the base vocabulary ({n_vocab})")
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, adapter.invocation_tokens,
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    write_self_eval(w, self_eval)

    tensors: list[tuple[str, np.ndarray]] = []
    for hf_name, (a, b) in sorted(adapter.pairs.items()):
        gname = model.gguf_name(hf_name)
        bid = model.block_id(gname)
        (_, b_gguf), = model.modify_tensors(b, gname, bid)
        for tname, arr in ((f"{gname}.lora_a", a.numpy()), (f"{gname}.lora_b", b_gguf.numpy())):
            if dtype == np.float16:  # a finite value past f16's range would be written as infinity
                check_f16_range(tname, arr, "f16", use="f32")
            tensors.append((tname, np.ascontiguousarray(arr, dtype=dtype)))
    for name, arr in tensors:
        w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)

    with atomic_file(out_path, force=force) as tmp:
        try:
            w.open_output_file(tmp)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, (_, arr) in enumerate(tensors):
                w.write_tensor_data(arr)
                yield Progress("adapter", i + 1, len(tensors))
        finally:
            w.close()
        check_adapter_loadable(tmp, out_path, info)
        if adapter.invocation_tokens:
            check_invoked_by_suffix(tmp, out_path, info, adapter.invocation_tokens)
    return AdapterResult(out_path, len(tensors), adapter.gguf_alpha, adapter.invocation_tokens,
                         time.perf_counter() - t0)


convert_adapter = to_the_end(convert_adapter_job)


def check_invoked_by_suffix(tmp: Path, out: Path, base: GGUFInfo, invocation: list[int]) -> None:
    """The runtime's own check (SelfEvaluator) that an aLoRA's invocation tokens occur in the self-eval suffix it is
    scored with: the suffix the written file resolves to on `base` (its --self-eval-config, else the default), which
    every scoring command would otherwise refuse."""
    from edge_adapt.engine.vocab import Vocab
    from edge_adapt.selfeval.evaluator import resolve_config
    from edge_adapt.selfeval.suffix import render_suffix, split_for_adapter, suffix_text

    with Vocab(base.path) as vocab:
        config = resolve_config(vocab, None, tmp)
        suffix = render_suffix(config, vocab)
        try:
            split_for_adapter(suffix, invocation)
        except UsageError:  # the runtime's advice is for a file already written; this one is not
            raise UsageError(
                f"{out}: not written, the aLoRA's invocation tokens {invocation} do not occur in the self-eval suffix "
                f"it would be scored with, {suffix_text(config, vocab)!r} (tokens {suffix}); give --self-eval-config "
                "a suffix that contains them"
            ) from None


def require_mergeable(adapter: LoraAdapter) -> None:
    if adapter.invocation_tokens:
        raise UsageError(
            f"{adapter.path} is an activated LoRA (it applies only after its invocation tokens) and cannot be "
            "merged into the weights; convert it with convert-adapter instead"
        )


def import_adapter(
    adapter: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> AdapterResult:
    """A GGUF LoRA / aLoRA adapter back to a PEFT directory for the transformers copy of `base` (`import_gguf`).

    The inverse of `convert_adapter`: Q/K rows of B are un-permuted and the GGUF alpha (scale x rank) becomes
    PEFT's lora_alpha, so PEFT applies the same `scale * B @ A`. f16 tensors widen to f32 exactly."""
    torch = require_torch()
    from peft import LoraConfig
    from safetensors.torch import save_file

    from edge_adapt.engine.gguf_file import inspect_gguf

    t0 = time.perf_counter()
    out_path = Path(out)
    # It is replaced as a whole: never the directory the process works in, nor one holding the files read.
    check_replaceable(out_path, inputs=(adapter, base))
    check_target(out_path, force=force, directory=True)  # a PEFT directory
    info = inspect_gguf(adapter, expect="adapter")
    base_info = inspect_gguf(base, expect="model")
    if info.architecture != base_info.architecture:
        raise ModelFileError(f"{info.path} is a {info.architecture} adapter, {base_info.path.name} a "
                             f"{base_info.architecture} model")
    model, hf_shapes = _base_layout(base_info)

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in gguf.GGUFReader(info.path).tensors:
        gname, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ModelFileError(f"{info.path}: tensor {t.name!r} is not a LoRA half (lora_a / lora_b)")
        hf = model.hf_name(gname)
        arr = np.asarray(t.data).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if part == "lora_b":
            arr = model.restore_tensor(arr, gname)
        halves.setdefault(hf, {})[part] = torch.from_numpy(np.ascontiguousarray(arr))
    pairs = {}
    for name, h in halves.items():
        if set(h) != {"lora_a", "lora_b"}:
            raise ModelFileError(f"{info.path}: incomplete adapter, {name} lacks lora_a or lora_b")
        pairs[name] = (h["lora_a"], h["lora_b"])
        _check_halves(info.path, name, *pairs[name], ("lora_a", "lora_b"))
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ModelFileError(f"{info.path}: mixed LoRA ranks {sorted(ranks)} have no single PEFT config")
    rank = ranks.pop()
    alpha = float(info.adapter.get("lora.alpha") or rank)  # llama.cpp: no alpha means scale 1
    invocation = [int(x) for x in info.adapter.get("alora.invocation_tokens") or []] or None
    check_fits(LoraAdapter(info.path, rank, alpha, alpha / rank, pairs, invocation), hf_shapes,
               f"base model {base_info.path.name}")

    targets = sorted({name.removesuffix(".weight").rsplit(".", 1)[1] for name in pairs})
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", alora_invocation_tokens=invocation)
    state = {}
    for name, (a, b) in pairs.items():
        stem = _PREFIX + name.removesuffix(".weight")
        state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = a, b
    with atomic_dir(out_path, force=force) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return AdapterResult(out_path, len(state), alpha, invocation, time.perf_counter() - t0)
