"""Evaluation: perplexity and KL to a teacher, for gqa and transformers models.

(``load_model`` / ``load_model_tokenizer`` are re-exported from :mod:`gqa.model.loading` for callers not
yet moved there.)
"""

from gqa.evaluate.perplexity import EvalResult, as_token_ids, evaluate_lm, kl_to_teacher, model_logits, perplexity
from gqa.model.loading import load_model, load_model_tokenizer

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
