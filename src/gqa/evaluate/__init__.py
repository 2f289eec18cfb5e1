"""Evaluation: perplexity, KL to a teacher, for gqa and transformers models; model loading for the CLI."""

from gqa.evaluate.loading import load_model, load_model_tokenizer
from gqa.evaluate.perplexity import EvalResult, as_token_ids, evaluate_lm, kl_to_teacher, model_logits, perplexity

__all__ = [
    "EvalResult",
    "evaluate_lm",
    "perplexity",
    "kl_to_teacher",
    "model_logits",
    "as_token_ids",
    "load_model",
    "load_model_tokenizer",
]
