"""The evaluation suite the CLI and the demo share: refusal, over-refusal, helpfulness NLL, KL drift."""

from __future__ import annotations

from typing import Any


def evaluate_model(model: Any, tokenizer: Any, harmful: list[str], safe: list[str], helpful: list[dict], *,
                   max_new_tokens: int, batch_size: int, reference: Any = None) -> dict[str, Any]:  # fmt: skip
    """The demo's metrics: refusal on harmful prompts, over-refusal on safe ones, helpfulness NLL, KL drift."""
    from . import metrics as ev

    results = {
        "harmful_refusal": ev.refusal_rate(model, tokenizer, harmful, max_new_tokens, batch_size),
        "safe_over_refusal": ev.over_refusal_rate(model, tokenizer, safe, max_new_tokens, batch_size),
        "helpful_nll": ev.response_nll(model, tokenizer, helpful, batch_size=batch_size),
    }
    if reference is not None or hasattr(model, "disable_adapter"):
        results["kl_drift"] = ev.kl_drift(model, reference, tokenizer, safe, batch_size=batch_size)
    return results


def summary_row(results: dict[str, Any]) -> dict[str, float]:
    return {
        "harmful_refusal": results["harmful_refusal"]["refusal_rate"],
        "safe_over_refusal": results["safe_over_refusal"]["over_refusal_rate"],
        "helpful_nll": results["helpful_nll"]["nll"],
        "kl_drift": results.get("kl_drift", {}).get("kl", 0.0),
    }
