"""Evaluation: perplexity, KL to a teacher, for gqa and transformers models."""

from gqa.evaluate.perplexity import EvalResult, as_token_ids, evaluate_lm, kl_to_teacher, model_logits, perplexity

__all__ = ["EvalResult", "evaluate_lm", "perplexity", "kl_to_teacher", "model_logits", "as_token_ids"]
