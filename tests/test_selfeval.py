"""Self-eval config, suffix rendering and the p_keep formula, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from edge_adapt.engine.chat import CHATML, render_chat
from edge_adapt.errors import UsageError
from edge_adapt.selfeval import (
    DEFAULT_QUESTION, SelfEvalConfig, answer_token, p_keep, render_suffix, split_for_adapter, suffix_text,
    suffix_tokens,
)


class CharTokenizer:
    """One token per character (special tokens too), with the ChatML template."""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def chat_prompt(self, messages, *, add_generation_prompt: bool = True) -> str:
        return render_chat(CHATML, messages, add_generation_prompt=add_generation_prompt)


def test_p_keep_is_no_over_yes_plus_no():
    logits = np.array([[0.0, 2.0, 1.0, 5.0], [3.0, -1.0, -1.0, 0.0]], np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = probs[:, 2] / (probs[:, 1] + probs[:, 2])
    assert p_keep(logits, yes=1, no=2) == pytest.approx(expected)
    assert p_keep(np.array([0.0, 1000.0, -1000.0]), yes=1, no=2)[0] == pytest.approx(0.0)  # no overflow


def test_chat_suffix_ends_the_answer_and_asks_as_a_new_user_turn():
    text = suffix_text(SelfEvalConfig(), CharTokenizer())
    assert text == f"<|im_end|>\n<|im_start|>user\n{DEFAULT_QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_raw_suffix_is_verbatim():
    cfg = SelfEvalConfig(format="raw", suffix="\nOK? ")
    assert render_suffix(cfg, CharTokenizer()) == [ord(c) for c in "\nOK? "]


def test_answer_must_be_one_token():
    assert answer_token(CharTokenizer(), "Y", "yes") == ord("Y")
    with pytest.raises(UsageError, match=r"yes='Yes' is 3 tokens .*exactly one token"):
        answer_token(CharTokenizer(), "Yes", "yes")


def test_plain_lora_is_on_for_the_whole_suffix():
    assert split_for_adapter([1, 2, 3], []) == ([], [1, 2, 3])


def test_alora_starts_at_its_invocation_tokens():
    assert split_for_adapter([9, 1, 2, 7, 1, 2, 5], [1, 2]) == ([9, 1, 2, 7], [1, 2, 5])  # the last occurrence
    with pytest.raises(UsageError, match="invocation tokens \\[4\\] do not occur"):
        split_for_adapter([1, 2, 3], [4])
    with pytest.raises(UsageError, match="^the aLoRA a.gguf's invocation tokens"):  # names the adapter
        split_for_adapter([1, 2, 3], [4], "the aLoRA a.gguf")


def test_raw_format_needs_a_suffix_and_answers_must_differ():
    with pytest.raises(UsageError, match="format 'raw' needs a non-empty `suffix`"):
        SelfEvalConfig.parse({"format": "raw"})
    with pytest.raises(UsageError, match="must differ"):
        SelfEvalConfig.parse({"yes": "No"})
    with pytest.raises(UsageError, match="questoin: Extra inputs"):
        SelfEvalConfig.parse({"questoin": "typo"})


def test_config_from_gguf_metadata_reads_self_eval_keys_only():
    meta = {"self_eval.question": "Right?", "self_eval.yes": "Y", "self_eval.no": "N", "self_eval.future": 1, "other": 2}
    cfg = SelfEvalConfig.from_gguf_metadata(meta)
    assert (cfg.question, cfg.yes, cfg.no, cfg.format) == ("Right?", "Y", "N", "chat")
    assert SelfEvalConfig.from_gguf_metadata({}) == SelfEvalConfig()
    with pytest.raises(UsageError, match="GGUF metadata edge_adapt.self_eval: format"):
        SelfEvalConfig.from_gguf_metadata({"self_eval.format": "xml"})


def test_config_from_file(tmp_path):
    toml = tmp_path / "se.toml"
    toml.write_text('[self_eval]\nformat = "raw"\nsuffix = "<|im_end|>"\nadapter = "a.gguf"\n')
    cfg = SelfEvalConfig.from_file(toml)
    assert cfg.format == "raw" and cfg.adapter == tmp_path / "a.gguf"  # relative to the file
    js = tmp_path / "se.json"
    js.write_text('{"question": "Sure?"}')
    assert SelfEvalConfig.from_file(js).question == "Sure?"
    js.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        SelfEvalConfig.from_file(js)


def test_a_prompt_field_the_format_does_not_read_is_refused():
    """Was: the default model's shipped aLoRA fixes a raw suffix, so a question given with it (even one too long
    for the context) was dropped in silence. Only its tokenizer is loaded."""
    from edge_adapt.engine.vocab import Vocab

    with Vocab() as vocab:
        with pytest.raises(UsageError, match=r"^self-eval question is read only with format 'chat'; the default "
                                             r"model's shipped adapter smollm2-135m-selfeval\.gguf sets format 'raw' "
                                             r"\(suffix '<\|im_end\|>Restart'\); default_adapter = false"):
            suffix_tokens(vocab, SelfEvalConfig(question="Wrong?"))
        without = SelfEvalConfig(question="Wrong?", default_adapter=False)
        assert "Wrong?" in vocab.detokenize(suffix_tokens(vocab, without))  # as the hint says
        with pytest.raises(UsageError, match="question is read only with format 'chat'; the self-eval config sets"):
            suffix_tokens(vocab, SelfEvalConfig(format="raw", suffix="?", question="Wrong?", default_adapter=False))
        with pytest.raises(UsageError, match="suffix is read only with format 'raw'; the self-eval config sets"):
            suffix_tokens(vocab, SelfEvalConfig(format="chat", suffix="?"))
        assert suffix_tokens(vocab, SelfEvalConfig(suffix="?")) == vocab.tokenize("?")  # the adapter's raw format
