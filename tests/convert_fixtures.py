"""Tiny random checkpoints for the converter tests, built on the spot (nothing is downloaded).

A byte-level BPE tokenizer is trained with `tokenizers` on a few KB of mixed text, with each family's own
pre-tokenizer (SmolLM-style digits + GPT-2 regex for Llama, the Qwen2 split regex for Qwen2); the models
are random transformers Llama / Qwen2 with a wide init so logits have a real spread; PEFT adapters get
random A and B so they change the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we've got 3 apples, 17 pears and 1024 grapes.",
    "Ünïcödé tëxt: café, naïve, Zürich, São Paulo, Øresund, 東京 and 北京, 안녕하세요, Привет мир, γειά σου.",
    "def add(a, b):\n    return a + b  # adds two numbers\n\nprint(add(2, 40))\n",
    "Tabs\tand  double  spaces,   triple   spaces,\n\nnew lines\r\nand CRLF. Emoji: 🙂🚀✨ done!",
    "Question: what is 7 * 8? Answer: 56. Question: what is 123 + 456? Answer: 579.",
    "I'm sure they'll say you'd rather we're done; don't worry, she's fine. THEY'LL SEE.",
    "Self-evaluation: Is the answer correct? Yes. No. Maybe. Score: 0.87, 0.13, 1e-5, -42.",
    "<html><body><p class=\"x\">Hello, world!</p></body></html> {\"key\": [1, 2, 3], \"ok\": true}",
]
CORPUS = "\n".join(CORPUS_LINES * 6)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIXED_TEXT = (
    "<|im_start|>user\nHello   wörld! 1234567 + 89 = ?\t東京 🙂\n\n  café's   naïve <tool> x=[1,2]"
    "<|im_end|>\n<|im_start|>assistant\nIt's 1234567.  \n"
)
PROMPTS = [
    "The quick brown fox",
    "Question: what is 7 * 8? Answer:",
    "def add(a, b):\n    return",
    "<|im_start|>user\nHello café 東京 🙂<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say 12345",
]


def train_tokenizer(out: Path, family: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from edge_adapt.convert.tokenizer import QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    if family == "llama":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES * 6, trainer=trainer)
    if family == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        fast.add_tokens(["<tool>"])  # a non-special added token: matched in text, but not a control token
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(out: Path, family: str, seed: int = 0) -> Path:
    """A tiny random checkpoint with tokenizer in `out`; returns `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, family)
    tok = AutoTokenizer.from_pretrained(str(out))
    common = dict(vocab_size=448, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.08)
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(hidden_size=128, intermediate_size=256, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, **common)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with torch.no_grad():  # non-trivial norm weights so a mixed-up norm tensor would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(out))
    return out


def build_lora(model_dir: Path, out: Path, *, invocation: list[int] | None = None, seed: int = 1) -> Path:
    """A PEFT LoRA (or aLoRA when `invocation` is given) with random A and B on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    kwargs = {"alora_invocation_tokens": invocation} if invocation else {}
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     **kwargs)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.15)
    peft_model.save_pretrained(str(out))
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- shared pytest fixtures and helpers (imported by the test_convert_* modules) ------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_model(tmp_path_factory.mktemp("llama") / "hf", "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_model(tmp_path_factory.mktemp("qwen2") / "hf", "qwen2")


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def llama_cpp_logits(path: Path, ids: list[int]) -> "np.ndarray":
    """Per-position logits from llama.cpp with an f32 KV cache, so only the conversion's error remains."""
    import llama_cpp
    import numpy as np

    from edge_adapt.engine.handles import llama_like_the_engine

    with llama_like_the_engine():  # AMX kernels crash on some quantized types: the engine avoids them too
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, n_batch=256, verbose=False,
                              type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model: object, ids: list[int]) -> "np.ndarray":
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # type: ignore[operator]
