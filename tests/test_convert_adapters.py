"""PEFT LoRA / aLoRA: merged into the model or applied by llama.cpp at run time, both match PEFT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from convert_fixtures import PROMPTS, build_lora, gguf_dir, llama_dir, qwen2_dir  # noqa: E402

from edge_adapt.convert import convert_adapter, convert_model  # noqa: E402
from edge_adapt.engine import Engine  # noqa: E402
from edge_adapt.engine.gguf_file import inspect_gguf  # noqa: E402
from edge_adapt.errors import ModelFileError, UsageError  # noqa: E402

__all__ = ["gguf_dir", "llama_dir", "qwen2_dir"]

# The engine keeps an f16 KV cache, which alone costs about 1e-3 of the logit scale.
TOL = 5e-3


def _peft_last_logits(hf_dir: Path, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_merged_and_runtime_match_peft(family: str, request: pytest.FixtureRequest, gguf_dir: Path,
                                            tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf_dir = request.getfixturevalue(f"{family}_dir")
    lora = build_lora(hf_dir, tmp_path / "lora")
    base, merged, adapter = gguf_dir / f"{family}.a.f32.gguf", tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    convert_model(hf_dir, base, type="f32", force=True)
    convert_model(hf_dir, merged, type="f32", merge_adapter=lora)
    convert_adapter(lora, base, adapter)
    assert inspect_gguf(adapter, expect="adapter").adapter["lora.alpha"] == pytest.approx(8.0)

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    worst_merged = worst_runtime = 0.0
    for prompt in PROMPTS[:3]:
        ids = tok(prompt)["input_ids"]
        ref = _peft_last_logits(hf_dir, lora, ids)
        with Engine(model=merged, ctx=128, device="cpu", threads=2) as e:
            worst_merged = max(worst_merged, _rel(e.open(ids).logits, ref))
        with Engine(model=base, ctx=128, device="cpu", threads=2) as e:
            a = e.load_adapter(adapter)
            with e.adapter(a):
                seq = e.open(ids)
            worst_runtime = max(worst_runtime, _rel(seq.logits, ref))
            e.release(seq)
            plain = e.open(ids).logits  # outside the block the base model answers
            assert _rel(plain, ref) > 0.05
    print(f"\n{family} LoRA: merged rel {worst_merged:.2e}, runtime rel {worst_runtime:.2e}")
    assert worst_merged < TOL and worst_runtime < TOL


def _alora_on_f32_base(family: str, request: pytest.FixtureRequest, gguf_dir: Path, tmp_path: Path,
                       tag: str) -> tuple[Path, object, list[int], Path, Path, Path]:
    """A fixture model's aLoRA (invoked by "<|im_start|>assistant"), its f32 base GGUF and the GGUF adapter:
    (hf_dir, tokenizer, invocation, PEFT dir, base GGUF, adapter GGUF)."""
    from transformers import AutoTokenizer

    hf_dir = request.getfixturevalue(f"{family}_dir")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    invocation = tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    alora = build_lora(hf_dir, tmp_path / "alora", invocation=invocation)
    base, adapter = gguf_dir / f"{family}.{tag}.f32.gguf", tmp_path / "alora.gguf"
    convert_model(hf_dir, base, type="f32", force=True)
    result = convert_adapter(alora, base, adapter)
    assert result.invocation_tokens == invocation
    return hf_dir, tok, invocation, alora, base, adapter


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_alora_applies_from_invocation_like_peft(family: str, request: pytest.FixtureRequest, gguf_dir: Path,
                                                 tmp_path: Path) -> None:
    hf_dir, tok, invocation, alora, base, adapter = _alora_on_f32_base(family, request, gguf_dir, tmp_path, "b")
    ids = tok(PROMPTS[3] + "Sure")["input_ids"]
    start = max(i for i in range(len(ids)) if ids[i : i + len(invocation)] == invocation)
    ref = _peft_last_logits(hf_dir, alora, ids)
    with Engine(model=base, ctx=128, device="cpu", threads=2) as e:
        a = e.load_adapter(adapter)
        assert list(a.invocation_tokens) == invocation
        seq = e.open(ids[:start])  # the prefix keeps the base model's KV, as PEFT's aLoRA does
        with e.adapter(a):
            e.extend([(seq, ids[start:])])
        rel = _rel(seq.logits, ref)
    print(f"\n{family} aLoRA: runtime rel {rel:.2e}")
    assert rel < TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_adapter_imports_back_to_the_same_peft_adapter(family: str, request: pytest.FixtureRequest,
                                                            gguf_dir: Path, tmp_path: Path) -> None:
    from edge_adapt.convert import import_adapter
    from edge_adapt.convert.adapter import load_peft_adapter

    hf_dir, tok, invocation, alora, base, adapter = _alora_on_f32_base(family, request, gguf_dir, tmp_path, "c")
    result = import_adapter(adapter, base, tmp_path / "back")
    assert result.invocation_tokens == invocation

    orig, back = load_peft_adapter(alora), load_peft_adapter(tmp_path / "back")
    assert (back.rank, back.scale, back.invocation_tokens) == (orig.rank, orig.scale, orig.invocation_tokens)
    assert set(back.pairs) == set(orig.pairs)
    for name, (a, b) in orig.pairs.items():  # Q/K rows un-permuted: every tensor exactly the original
        assert np.array_equal(back.pairs[name][0].numpy(), a.numpy()), name
        assert np.array_equal(back.pairs[name][1].numpy(), b.numpy()), name
    ids = tok(PROMPTS[3] + "<|im_start|>assistant Sure")["input_ids"]
    np.testing.assert_allclose(_peft_last_logits(hf_dir, tmp_path / "back", ids),
                               _peft_last_logits(hf_dir, alora, ids), rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="already exists"):
        import_adapter(adapter, base, tmp_path / "back")
    with pytest.raises(ModelFileError, match="not an adapter GGUF|adapter GGUF"):
        import_adapter(base, base, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_alora_scores_with_the_suffix_it_was_converted_for_and_another_is_refused_naming_the_fix(
        request: pytest.FixtureRequest, gguf_dir: Path, tmp_path: Path) -> None:
    """The runtime's refusal of a suffix without the aLoRA's invocation tokens said only "the suffix must contain
    them"; it names the two ways out."""
    from edge_adapt.selfeval import SelfEvalConfig, SelfEvaluator

    _, _, invocation, _, base, adapter = _alora_on_f32_base("llama", request, gguf_dir, tmp_path, "d")
    with Engine(model=base, ctx=128, device="cpu", threads=1) as e:
        ev = SelfEvaluator(e, SelfEvalConfig(yes="Y", no="N"), adapter_path=adapter)  # the default question's suffix
        assert ev.adapter_part[: len(invocation)] == invocation
        with pytest.raises(UsageError) as err:
            SelfEvaluator(e, SelfEvalConfig(format="raw", suffix="<|im_end|>Restart", yes="Y", no="N"),
                          adapter_path=adapter)
    assert f"invocation tokens {invocation} do not occur in the self-eval suffix" in str(err.value)
    assert str(err.value).endswith("; convert the adapter again with a --self-eval-config whose suffix contains them, "
                                   "or score with a self-eval config whose suffix does")


def test_an_adapter_is_checked_against_its_base_and_loaded_by_llama_cpp_before_it_is_published(tmp_path: Path):
    """convert-adapter's last check: the written file against the base it adapts (llama.cpp's own rules, then
    llama.cpp loading it on the base), its errors naming the output, not the temporary file gone by then."""
    from lora_files import make_lora

    from edge_adapt.convert.model import check_adapter_loadable
    from edge_adapt.engine.default_model import default_model_path

    base = inspect_gguf(default_model_path(), expect="model")
    out = tmp_path / "adapter.gguf"
    check_adapter_loadable(make_lora(tmp_path / ".adapter.gguf.1.tmp"), out, base)
    other = make_lora(tmp_path / ".adapter.gguf.2.tmp", n_embd=960, n_embd_kv=320, n_blocks=32)
    with pytest.raises(ModelFileError) as err:
        check_adapter_loadable(other, out, base)
    assert str(err.value).startswith(f"{out}: not written, adapter for 'blk.0.attn_q.weight'"), err.value
    assert "does not fit" in str(err.value) and ".tmp" not in str(err.value)
