"""HF -> GGUF model conversion: logits and tokenization match transformers; metadata lands where expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_fixtures import (  # noqa: E402
    MIXED_TEXT, PROMPTS, gguf_dir, hf_logits, llama_cpp_logits, llama_dir, qwen2_dir,
)

from edge_adapt.convert import convert_model  # noqa: E402
from edge_adapt.engine.gguf_file import inspect_gguf  # noqa: E402

__all__ = ["gguf_dir", "llama_dir", "qwen2_dir"]  # session fixtures, re-exported for pytest

# (type, max |diff| / max |logit| allowed): f32 is exact up to summation order; the rest lose mantissa bits.
TOLERANCES = {"f32": 1e-3, "f16": 1e-2, "bf16": 4e-2, "q8_0": 0.15}


def _compare(hf_dir: Path, gguf_path: Path) -> tuple[float, float, float]:
    """Over all PROMPTS: max relative logit diff, top-1 agreement, and top-1 agreement where HF is decisive."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    worst, agree, decisive = 0.0, [], []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ref, got = hf_logits(model, ids), llama_cpp_logits(gguf_path, ids)
        worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
        same = ref.argmax(-1) == got.argmax(-1)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        agree.extend(same.tolist())
        decisive.extend(same[margin > 0.05 * np.abs(ref).max()].tolist())
    return worst, float(np.mean(agree)), float(np.mean(decisive))


def _logit_correlation(hf_dir: Path, gguf_path: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = tok(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    ref, got = hf_logits(model, ids), llama_cpp_logits(gguf_path, ids)
    return float(np.corrcoef(ref.ravel(), got.ravel())[0, 1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0"])
def test_converted_logits_match_transformers(family: str, qtype: str, request: pytest.FixtureRequest,
                                             gguf_dir: Path) -> None:
    hf_dir = request.getfixturevalue(f"{family}_dir")
    out = gguf_dir / f"{family}.{qtype}.gguf"
    convert_model(hf_dir, out, type=qtype, force=True)
    rel, top1, top1_decisive = _compare(hf_dir, out)
    print(f"\n{family} {qtype}: max|diff|/max|logit| = {rel:.2e}, top-1 {top1:.1%}, top-1 where decisive {top1_decisive:.1%}")
    assert rel <= TOLERANCES[qtype]
    if qtype == "q8_0":
        # Random tiny models have many near-ties; where HF's top-2 margin exceeds 5% of the logit scale the
        # quantized file must agree. (The default-model round trip measures q8_0 on a trained model.)
        assert top1_decisive >= 0.99 and top1 >= 0.85
    else:
        assert top1 >= 0.95


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_ids_identical_on_mixed_text(family: str, request: pytest.FixtureRequest, gguf_dir: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    hf_dir = request.getfixturevalue(f"{family}_dir")
    out = gguf_dir / f"{family}.tok.gguf"
    convert_model(hf_dir, out, type="f16", force=True)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        add_bos = family == "llama"  # the Llama fixture's post-processor prepends <s>; Qwen2's adds nothing
        for text in (MIXED_TEXT, *PROMPTS, "  leading and trailing  ", "1234567890 ١٢٣ 3.14159", "\n\n\t \n"):
            ref = tok(text)["input_ids"]
            got = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            assert got == ref, text
    finally:
        llm.close()


def test_kquant_types_go_through_llama_quantize(llama_dir: Path, gguf_dir: Path) -> None:
    for qtype, name in (("q4_k_m", "Q4_K_M"), ("q6_k", "Q6_K")):
        out = gguf_dir / f"llama.{qtype}.gguf"
        convert_model(llama_dir, out, type=qtype, force=True)
        info = inspect_gguf(out)
        assert info.file_type == name
        assert any(t.endswith("_K") for t in info.tensor_types)  # the 256-wide rows really are K-quantized
        corr = _logit_correlation(llama_dir, out)
        print(f"\nllama {qtype}: logit correlation with transformers {corr:.3f}")
        assert corr > 0.8  # 4-6 bit weights of a random model: a sanity check that nothing is scrambled


def test_native_4bit_types_written_directly(qwen2_dir: Path, gguf_dir: Path) -> None:
    for qtype in ("q4_0", "q4_1"):
        out = gguf_dir / f"qwen2.{qtype}.gguf"
        convert_model(qwen2_dir, out, type=qtype, force=True)
        assert inspect_gguf(out).file_type == qtype.upper()
        corr = _logit_correlation(qwen2_dir, out)
        print(f"\nqwen2 {qtype}: logit correlation with transformers {corr:.3f}")
        assert corr > 0.8


def test_self_eval_config_written_as_metadata(qwen2_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "self_eval.json"
    cfg.write_text('{"suffix": "Is this correct?", "yes_token": 15, "threshold": 0.5, "enabled": true,'
                   ' "labels": ["Yes", "No"], "weights": [1, 0.5]}')
    out = tmp_path / "m.gguf"
    convert_model(qwen2_dir, out, type="f16", self_eval_config=cfg)
    meta = inspect_gguf(out).edge_adapt
    assert meta["self_eval.suffix"] == "Is this correct?"
    assert meta["self_eval.yes_token"] == 15
    assert meta["self_eval.threshold"] == pytest.approx(0.5)
    assert meta["self_eval.enabled"] is True
    assert meta["self_eval.labels"] == ["Yes", "No"]
    assert meta["self_eval.weights"] == pytest.approx([1.0, 0.5])


def test_chat_template_and_special_tokens_carried(llama_dir: Path, tmp_path: Path) -> None:
    from edge_adapt.engine import Engine

    out = tmp_path / "m.gguf"
    convert_model(llama_dir, out, type="f16")
    with Engine(model=out, ctx=128, device="cpu", threads=2) as e:
        prompt = e.chat_prompt([{"role": "user", "content": "hi"}])
        assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert e.is_eog(e.tokenize("</s>")[0])


def test_padding_tokens_stay_unused_through_import_and_back(llama_dir: Path, tmp_path: Path) -> None:
    """HF -> GGUF -> HF -> GGUF gives the same vocabulary: the embedding rows past the tokenizer are padding
    (UNUSED) both times, not normal tokens the second time."""
    import gguf

    from edge_adapt.convert import import_gguf

    first = convert_model(llama_dir, tmp_path / "a.gguf", type="f32").path
    import_gguf(first, tmp_path / "back")
    second = convert_model(tmp_path / "back", tmp_path / "b.gguf", type="f32").path

    def vocab(path: Path) -> tuple[list[str], list[int]]:
        r = gguf.GGUFReader(path)
        toks, types = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
        return ([bytes(toks.parts[i]).decode() for i in toks.data], [int(types.parts[i][0]) for i in types.data])

    (tokens, types), again = vocab(first), vocab(second)
    assert gguf.TokenType.UNUSED in types  # the fixture pads its vocabulary
    assert again == (tokens, types)


def test_gpt2_pre_tokenizer_written_as_llama_cpp_names_it(llama_dir: Path, tmp_path: Path) -> None:
    """A plain GPT-2 ByteLevel pre-tokenizer is llama.cpp's "gpt-2": the file loads and tokenizes as HF does,
    and imports back."""
    import llama_cpp
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from convert_fixtures import CORPUS_LINES
    from edge_adapt.convert import import_gguf

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src, ignore=lambda _d, names: [n for n in names if n.startswith(("tokenizer", "special"))])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS_LINES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(src))

    out = convert_model(src, tmp_path / "m.gguf", type="f16").path
    hf = AutoTokenizer.from_pretrained(str(src))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in (MIXED_TEXT, *PROMPTS):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text)["input_ids"], text
    finally:
        llm.close()
    import_gguf(out, tmp_path / "back")
    back = AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert back(MIXED_TEXT)["input_ids"] == hf(MIXED_TEXT)["input_ids"]


def _mistral(llama_dir: Path, tmp_path: Path, window: int | None, name: str = "m.gguf") -> Path:
    """The tiny llama converted as a Mistral with this sliding window (None: full attention)."""
    import json

    src = tmp_path / "src"
    if not src.exists():
        shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
    (src / "config.json").write_text(json.dumps(cfg))
    return convert_model(src, tmp_path / name, type="f16").path


def test_mistral_sliding_window_bounds_the_training_context(llama_dir: Path, tmp_path: Path) -> None:
    """llama.cpp's llama graph attends to every earlier token: that is Mistral's sliding-window attention only
    within the window, so the file's training context is the window (and the engine refuses a longer one)."""
    from edge_adapt.engine import Engine
    from edge_adapt.errors import BudgetError

    out = _mistral(llama_dir, tmp_path, 128)
    assert inspect_gguf(out).n_ctx_train == 128
    with pytest.raises(BudgetError, match="exceeds the model's training context 128"):
        Engine(model=out, ctx=256, device="cpu", threads=2)
    # Mistral 7B v0.2 and later: full attention
    assert inspect_gguf(_mistral(llama_dir, tmp_path, None, "full.gguf")).n_ctx_train == 512


def test_a_sized_context_is_cut_to_a_training_context_that_is_no_multiple_of_256(llama_dir: Path, tmp_path: Path) -> None:
    """Was: a job needing 280 tokens of a model trained for 300 was sized 512 (llama.cpp's cells), and the
    engine refused that as `--ctx 512 exceeds the model's training context 300`, a flag the user never gave."""
    from edge_adapt.engine import EngineOptions
    from edge_adapt.errors import ContextOverflowError
    from edge_adapt.sizing import ensure, for_generation, load_engine

    out = _mistral(llama_dir, tmp_path, 300)
    size = for_generation([1] * 200, 2, 80)
    assert size.ctx == 512
    with load_engine(size, EngineOptions(model=out, device="cpu", threads=2)) as engine:
        assert engine.options.ctx == 300 and engine.n_ctx_seq >= 280
        ensure(engine, for_generation([1] * 250, 2, 40))  # 290 tokens: held already
        assert engine.options.ctx == 300
        with pytest.raises(ContextOverflowError, match=r"^the prompt \(250 tokens\) and max_tokens 60 need 310 "
                                                       r"tokens, more than the model's training context of 300$"):
            ensure(engine, for_generation([1] * 250, 2, 60))


@pytest.mark.parametrize("scaling", [{"rope_type": "default"}, {"type": "default"}])
def test_default_rope_scaling_is_no_scaling(scaling: dict, llama_dir: Path, tmp_path: Path) -> None:
    """transformers reads a legacy rope_scaling of type "default" as no scaling; so does the converter."""
    import json

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = scaling
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_model(src, tmp_path / "m.gguf", type="f16").path
    assert not any(key.startswith("llama.rope.scaling") for key in gguf.GGUFReader(out).fields)


def test_llama3_rope_scaling_matches_transformers_beyond_the_original_context(llama_dir: Path, tmp_path: Path) -> None:
    """Llama 3.1 / 3.2 frequency-dependent rope scaling travels as the rope_freqs tensor; past
    original_max_position_embeddings (64 here, so every regime of the scaling is used) llama.cpp must still give
    transformers' logits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {**scaling, "rope_theta": theta}
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_model(src, tmp_path / "m.gguf", type="f32").path
    assert "rope_freqs.weight" in inspect_gguf(out).tensor_shapes

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_type"] == "llama3"
    ids = AutoTokenizer.from_pretrained(str(src))(" ".join(PROMPTS) * 3)["input_ids"][:240]
    assert len(ids) == 240  # well past the original 64 positions, inside llama_cpp_logits' 256
    ref, got = hf_logits(model, ids), llama_cpp_logits(out, ids)
    assert np.abs(ref - got).max() <= 1e-3 * np.abs(ref).max()
    unscaled = json.loads((llama_dir / "config.json").read_text())  # the scaling must matter at these positions
    assert unscaled.get("rope_parameters", {}).get("rope_type", "default") == "default"
    plain = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    assert np.abs(hf_logits(plain, ids) - ref)[64:].max() > 10 * np.abs(ref - got).max()
