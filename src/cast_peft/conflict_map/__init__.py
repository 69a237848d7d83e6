"""The conflict map: per-head OC, FS and score, selection of the heads to skip, storage and plots."""

from .._core.errors import ConflictMapError
from .map import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_KV_SCORING,
    DEFAULT_NORMALIZATION,
    DEFAULT_SKIP_RATIO,
    KV_SCORINGS,
    NORMALIZATIONS,
    POLICIES,
    ConflictMap,
    combine_scores,
    normalize,
    rank01,
    spearman,
)


__all__ = [
    "COMBINES", "DEFAULT_COMBINE", "DEFAULT_KV_SCORING", "DEFAULT_NORMALIZATION", "DEFAULT_SKIP_RATIO", "KV_SCORINGS",
    "NORMALIZATIONS", "POLICIES", "ConflictMap", "ConflictMapError", "combine_scores", "normalize", "rank01", "spearman",
]  # fmt: skip
