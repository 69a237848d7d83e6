"""Selection: which heads to skip for a budget (ratio, count or threshold), by score or a budget-matched control."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from .._core.errors import CastWarning, ConfigError
from .scoring import _choice


POLICIES = ("score", "oc", "fs", "random")
DEFAULT_SKIP_RATIO = 0.1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def select_units(
    score: torch.Tensor,
    oc: torch.Tensor,
    fs: torch.Tensor,
    skip_ratio: float | None,
    skip_k: int | None,
    threshold: float | None,
    policy: str,
    seed: int,
) -> dict[int, list[int]]:
    """The units (query or KV heads) to skip, ``{layer: [unit, ...]}``: see ``ConflictMap.select``."""
    _choice("policy", policy, POLICIES)
    given = [
        name for name, v in (("skip_ratio", skip_ratio), ("skip_k", skip_k), ("threshold", threshold)) if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"Give one budget, not {given}: skip_ratio, skip_k or threshold.")
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r} must be an integer.")
    n = score.numel()
    if skip_k is not None:
        if not _is_int(skip_k):
            raise ConfigError(f"skip_k={skip_k!r} must be an integer count of heads (e.g. skip_k=3).")
        k = int(skip_k)
    elif threshold is not None:
        if not _is_finite_real(threshold):
            raise ConfigError(f"threshold={threshold!r} must be a finite number (a score; scores are in [0, 1]).")
        k = int((score >= threshold).sum())  # the budget always comes from the score: controls match it
    else:
        ratio = DEFAULT_SKIP_RATIO if skip_ratio is None else skip_ratio
        if not _is_finite_real(ratio) or not 0 <= ratio < 1:
            raise ConfigError(f"skip_ratio={ratio!r} must be in [0, 1) (a fraction of all heads).")
        k = int(round(ratio * n))
    if not 0 <= k < n:
        raise ConfigError(
            f"Skipping {k} of {n} heads is not possible: skip at least 0 and fewer than all "
            f"(lower skip_k / skip_ratio, or raise threshold)."
        )
    if policy == "random":
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    else:
        values = {"score": score, "oc": oc, "fs": fs}[policy].reshape(-1)
        if k and bool((values == values[0]).all()):
            warnings.warn(
                f"Every head has the same {policy} ({float(values[0]):.4g}), so there is nothing to rank: the "
                f"{k} heads picked are simply the first by index. The map carries no signal; diagnose with more "
                "(or other) calibration data.",
                CastWarning,
                stacklevel=3,
            )
        chosen = torch.sort(-values, stable=True).indices[:k]
    width = score.shape[1]
    result: dict[int, list[int]] = {}
    for flat in sorted(int(i) for i in chosen):
        result.setdefault(flat // width, []).append(flat % width)
    return result
