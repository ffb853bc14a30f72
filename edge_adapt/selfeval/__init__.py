"""Self-evaluation: append a short suffix to a response on a scratch fork and read P("No") vs P("Yes")."""

from edge_adapt.selfeval.config import DEFAULT_QUESTION, SelfEvalConfig
from edge_adapt.selfeval.evaluator import SelfEvaluator, p_keep, suffix_tokens
from edge_adapt.selfeval.suffix import answer_token, render_suffix, split_for_adapter, suffix_text

__all__ = [
    "DEFAULT_QUESTION", "SelfEvalConfig", "SelfEvaluator", "p_keep", "suffix_tokens",
    "render_suffix", "suffix_text", "answer_token", "split_for_adapter",
]
