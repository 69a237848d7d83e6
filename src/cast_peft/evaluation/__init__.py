"""Offline evaluation: refusal, over-refusal, perplexity, response NLL, multiple choice, KL drift, and the suite."""

from .metrics import (
    REFUSAL_OPENERS,
    generate_responses,
    is_refusal,
    kl_drift,
    logit_refusal_score,
    multiple_choice_accuracy,
    over_refusal_rate,
    perplexity,
    refusal_rate,
    response_nll,
)
from .suite import evaluate_model, summary_row


__all__ = [
    "REFUSAL_OPENERS", "is_refusal", "generate_responses", "refusal_rate", "over_refusal_rate", "logit_refusal_score",
    "perplexity", "response_nll", "multiple_choice_accuracy", "kl_drift", "evaluate_model",
    "summary_row",
]  # fmt: skip
