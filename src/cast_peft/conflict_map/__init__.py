"""The conflict map: per-head OC, FS and score (`scoring`), the heads to skip (`selection`), storage and plots, and
the `ConflictMap` facade that holds one model's measurements."""

from .._core.errors import ConflictMapError
from .map import ConflictMap
from .scoring import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_KV_SCORING,
    DEFAULT_NORMALIZATION,
    KV_SCORINGS,
    NORMALIZATIONS,
    combine_scores,
    normalize,
    rank01,
    spearman,
)
from .selection import DEFAULT_SKIP_RATIO, POLICIES


__all__ = [
    "COMBINES", "DEFAULT_COMBINE", "DEFAULT_KV_SCORING", "DEFAULT_NORMALIZATION", "DEFAULT_SKIP_RATIO", "KV_SCORINGS",
    "NORMALIZATIONS", "POLICIES", "ConflictMap", "ConflictMapError", "combine_scores", "normalize", "rank01", "spearman",
]  # fmt: skip
