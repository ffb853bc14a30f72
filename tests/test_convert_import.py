"""GGUF -> transformers: what the GGUF says survives import (biases, the special tokens a text gets, the
self-eval metadata), so that import -> convert gives back the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_fixtures import PROMPTS, hf_logits, llama_cpp_logits, llama_dir, qwen2_dir  # noqa: E402

from edge_adapt.convert import convert_model, import_gguf  # noqa: E402
from edge_adapt.engine.gguf_file import inspect_gguf  # noqa: E402
from edge_adapt.errors import UsageError  # noqa: E402

__all__ = ["llama_dir", "qwen2_dir"]  # session fixtures, re-exported for pytest


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_biases_convert_and_survive_import(bias: str, llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    cfg = LlamaConfig.from_pretrained(str(src))
    setattr(cfg, bias, True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):  # random init leaves them at zero
                p.normal_(0, 0.5)
    model.save_pretrained(str(src))

    ids = AutoTokenizer.from_pretrained(str(src))(PROMPTS[0])["input_ids"]
    ref = hf_logits(model, ids)
    gguf_path = convert_model(src, tmp_path / "m.gguf", type="f32").path
    np.testing.assert_allclose(llama_cpp_logits(gguf_path, ids), ref, rtol=0, atol=1e-3 * np.abs(ref).max())
    import_gguf(gguf_path, tmp_path / "back")
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_cfg[bias] is True and back_cfg["mlp_bias" if bias == "attention_bias" else "attention_bias"] is False
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(back, ids), ref, rtol=0, atol=1e-4)


def test_imported_tokenizer_adds_the_eos_the_gguf_adds(llama_dir: Path, tmp_path: Path) -> None:
    """A post-processor "<s> $A </s>" becomes add_eos_token in the GGUF, and the imported tokenizer adds both."""
    import llama_cpp
    from tokenizers import processors
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    tok = AutoTokenizer.from_pretrained(str(src))
    bos, eos = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    tok.save_pretrained(str(src))
    ref = AutoTokenizer.from_pretrained(str(src))("hi there")["input_ids"]
    assert ref[0] == bos and ref[-1] == eos

    gguf_path = convert_model(src, tmp_path / "m.gguf", type="f16").path
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"hi there", add_bos=True, special=True) == ref
    finally:
        llm.close()
    import_gguf(gguf_path, tmp_path / "back")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "back"))("hi there")["input_ids"] == ref


SELF_EVAL = {"suffix": "Is this correct?", "yes_token": 15, "labels": ["Yes", "No"]}


def test_self_eval_metadata_survives_import_and_convert(qwen2_dir: Path, tmp_path: Path) -> None:
    first = convert_model(qwen2_dir, tmp_path / "a.gguf", type="f16", self_eval_config=SELF_EVAL).path
    meta = inspect_gguf(first).edge_adapt
    import_gguf(first, tmp_path / "back")

    again = convert_model(tmp_path / "back", tmp_path / "b.gguf", type="f16").path
    assert inspect_gguf(again).edge_adapt == meta
    # The file import wrote, given explicitly, says the same (its keys carry the self_eval. prefix once).
    explicit = convert_model(tmp_path / "back", tmp_path / "c.gguf", type="f16",
                             self_eval_config=tmp_path / "back" / "edge_adapt.json").path
    assert inspect_gguf(explicit).edge_adapt == meta
    # An explicit config wins over the one the folder carries.
    other = convert_model(tmp_path / "back", tmp_path / "d.gguf", type="f16", self_eval_config={"suffix": "Sure?"}).path
    assert inspect_gguf(other).edge_adapt == {"self_eval.suffix": "Sure?"}


def test_self_eval_key_given_twice_refused(qwen2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="both with and without the self_eval. prefix"):
        convert_model(qwen2_dir, tmp_path / "m.gguf", self_eval_config={"suffix": "a", "self_eval.suffix": "b"})
    assert not (tmp_path / "m.gguf").exists()


def test_general_metadata_survives_import_and_convert(qwen2_dir: Path, tmp_path: Path) -> None:
    import gguf

    def general(path: Path) -> dict:
        fields = gguf.GGUFReader(path).fields
        return {k: fields[k].contents() for k in fields if k.startswith("general.") and k != "general.file_type"}

    src = tmp_path / "src"
    shutil.copytree(qwen2_dir, src)
    (src / "gguf_general.json").write_text(json.dumps(
        {"name": "Tiny Qwen", "license": "apache-2.0", "organization": "Example", "languages": ["en", "fr"],
         "general.size_label": "1M", "architecture": "ignored: the writer's own"}))
    first = convert_model(src, tmp_path / "a.gguf", type="f16").path
    meta = general(first)
    assert meta["general.name"] == "Tiny Qwen" and meta["general.languages"] == ["en", "fr"]
    assert meta["general.license"] == "apache-2.0" and meta["general.size_label"] == "1M"
    assert meta["general.architecture"] == "qwen2"

    import_gguf(first, tmp_path / "back")
    kept = json.loads((tmp_path / "back" / "gguf_general.json").read_text())
    assert kept == {"name": "Tiny Qwen", "license": "apache-2.0", "organization": "Example",
                    "languages": ["en", "fr"], "size_label": "1M"}
    assert general(convert_model(tmp_path / "back", tmp_path / "b.gguf", type="f16").path) == meta
    # A title given explicitly wins; the rest is kept.
    named = general(convert_model(tmp_path / "back", tmp_path / "c.gguf", type="f16", name="Mine").path)
    assert named == {**meta, "general.name": "Mine"}
