"""Scoring: OC from gradient inner products, normalisation of OC and FS, their combination, rank correlation."""

from __future__ import annotations

import math

import torch

from .._core.errors import ConfigError


KV_SCORINGS = ("shared", "separate")
COMBINES = ("product", "sum", "oc", "fs")
NORMALIZATIONS = ("rank", "minmax")
# Defaults picked by benchmarks/map_stability.py (SmolLM2-135M-Instruct, split-half): min-max normalisation keeps the
# many low-FS heads (whose ranks are noise) near a zero score, so the top of the product (the skip set) is decided by
# the few clearly sensitive heads and is the most reproducible; scoring k/v per KV head ("separate") gave both a
# higher score correlation and a higher skip-set overlap than folding the shared k/v rows into every head's θ_h.
# Caveat (same benchmark): that skip set shares ~2/3 of its heads with the FS-only control; rank normalisation mixes
# OC and FS evenly but was less stable. The trade-off study (benchmarks/results/tradeoff/reduced) did not single out
# a better rule: on SmolLM2 the score's skip set beat random skipping only by 1-3 of 80 XSTest prompts (safety-only
# regime, 3 seeds) and saved 2-6% of LoRA's over-refusal cost; FS-only selection did as well and OC-only no better
# than random. So these are the most reproducible choice, not a proven better one.
DEFAULT_KV_SCORING = "separate"
DEFAULT_COMBINE = "product"
DEFAULT_NORMALIZATION = "minmax"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}.")
    return value


def rank01(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) scaled to [0, 1]; 0.5 everywhere for a constant input."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    if n == 1:
        return torch.full_like(x, 0.5, dtype=torch.float64)
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    sorted_vals = flat[order].tolist()
    start = 0
    for i in range(1, n + 1):  # average over runs of equal values
        if i == n or sorted_vals[i] != sorted_vals[start]:
            ranks[order[start:i]] = (start + i - 1) / 2
            start = i
    return (ranks / (n - 1)).view(x.shape)


def normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    """``"rank"``: average rank in [0, 1]; ``"minmax"``: ``(x − min) / (max − min)`` (1 everywhere if constant)."""
    if _choice("normalization", how, NORMALIZATIONS) == "rank":
        return rank01(x)
    x = x.double()
    span = x.max() - x.min()
    return torch.ones_like(x) if span == 0 else (x - x.min()) / span


def combine_scores(oc: torch.Tensor, fs: torch.Tensor, combine: str, normalization: str) -> torch.Tensor:
    """The head score from OC and FS, each normalised over all heads of the model first."""
    _choice("combine", combine, COMBINES)
    oc_n, fs_n = normalize(oc, normalization), normalize(fs, normalization)
    if combine == "product":
        return oc_n * fs_n
    if combine == "sum":
        return (oc_n + fs_n) / 2
    return oc_n if combine == "oc" else fs_n


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either input is constant."""
    ra, rb = rank01(a).reshape(-1), rank01(b).reshape(-1)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def oc_from(stats: torch.Tensor) -> torch.Tensor:
    ss, uu, su = stats.unbind(-1)
    denom = (ss * uu).sqrt()
    # A block with a zero gradient for either objective has no direction: treat it as orthogonal (OC = 1).
    cos = torch.where(denom > 0, su / denom.clamp_min(1e-300), torch.zeros_like(su))
    return 1 - cos.clamp(-1, 1)
