"""`ConflictMap`: per-head optimisation conflict (OC), functional sensitivity (FS) and their combined score.

A map stores what the diagnosis measured, and derives the scores from it, so scoring choices can be changed without
diagnosing again (:meth:`ConflictMap.rescore`):

* ``stats[role]``: ``[layers, units, 3]`` float64 ``(⟨G_s,G_s⟩, ⟨G_u,G_u⟩, ⟨G_s,G_u⟩)`` of the safety (s) and utility
  (u) gradients of the mean calibration losses, over each unit's block of the q, k, v (rows and bias entries) and
  o (input columns) projections. Units are query heads for q/o, KV heads for k/v.
* ``fs_signed``: ``[layers, heads]`` loss change ``L_u(head ablated) − L_u``: exact (``sensitivity="ablation"``) or
  its first-order (Taylor) estimate ``−Σ_tokens ⟨a_h, ∂L_u/∂a_h⟩``.

Derived (``[layers, heads]``): ``oc = 1 − cos(G_s(h), G_u(h))`` in [0, 2] over θ_h, ``fs = |fs_signed|`` and
``score = combine(normalise(oc), normalise(fs))``. θ_h depends on ``kv_scoring``: ``"shared"`` puts the k/v rows of
head h's KV head into θ_h; ``"separate"`` scores q+o per query head and k+v per KV head (``oc_kv``, ``fs_kv``,
``score_kv``: ``[layers, kv_heads]``; a KV group's FS is that of ablating all its query heads at once).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._core.errors import ConfigError, ConflictMapError
from ..geometry import ROLES, AttentionGeometry, HeadCounts
from .scoring import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_KV_SCORING,
    DEFAULT_NORMALIZATION,
    KV_SCORINGS,
    NORMALIZATIONS,
    _choice,
    combine_scores,
    oc_from,
    spearman,
)
from .selection import DEFAULT_SKIP_RATIO, select_units
from .storage import read_map, write_map


class ConflictMap:
    """The head-level conflict map of one model (see the module docstring for the definitions).

    Args:
        counts: the model's head counts (``AttentionGeometry.from_model(model).counts``).
        stats: ``{"q"|"k"|"v"|"o": [layers, units, 3]}`` gradient inner products (see the module docstring).
        fs_signed: ``[layers, heads]`` (estimated) loss change of ablating each head.
        fs_kv_signed: ``[layers, kv_heads]`` loss change of ablating each KV head's query group; derived from
            ``fs_signed`` by summation when not given (exact for the Taylor estimate, which is linear).
        kv_scoring, combine, normalization: how scores are derived (see :meth:`rescore`).
        metadata: model identity, data hashes and sizes, options, seed, versions (JSON-serialisable).
        extras: further ``[layers, *]`` tensors kept with the map (e.g. the Taylor estimate beside an ablation FS).
    """

    def __init__(
        self,
        counts: HeadCounts,
        stats: Mapping[str, torch.Tensor],
        fs_signed: torch.Tensor,
        *,
        fs_kv_signed: torch.Tensor | None = None,
        kv_scoring: str = DEFAULT_KV_SCORING,
        combine: str = DEFAULT_COMBINE,
        normalization: str = DEFAULT_NORMALIZATION,
        metadata: Mapping[str, Any] | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ):
        self.counts = counts
        self.kv_scoring = _choice("kv_scoring", kv_scoring, KV_SCORINGS)
        self.combine = _choice("combine", combine, COMBINES)
        self.normalization = _choice("normalization", normalization, NORMALIZATIONS)
        geometry = AttentionGeometry(counts)
        L, H, K = counts.num_layers, counts.num_heads, counts.num_kv_heads
        self.stats = {}
        for role in ROLES:
            expected = (L, geometry.units(role), 3)
            tensor = stats.get(role)
            if tensor is None or tuple(tensor.shape) != expected:
                raise ConflictMapError(
                    f"stats[{role!r}] must have shape {expected} for {counts}; got "
                    f"{None if tensor is None else tuple(tensor.shape)}."
                )
            self.stats[role] = tensor.detach().double().cpu()
        if tuple(fs_signed.shape) != (L, H):
            raise ConflictMapError(f"fs_signed must have shape {(L, H)}; got {tuple(fs_signed.shape)}.")
        self.fs_signed = fs_signed.detach().double().cpu()
        if fs_kv_signed is None:
            fs_kv_signed = self.fs_signed[:, geometry.kv_groups()].sum(-1)
        if tuple(fs_kv_signed.shape) != (L, K):
            raise ConflictMapError(f"fs_kv_signed must have shape {(L, K)}; got {tuple(fs_kv_signed.shape)}.")
        self.fs_kv_signed = fs_kv_signed.detach().double().cpu()
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.extras = {name: t.detach().cpu() for name, t in (extras or {}).items()}
        stored = {"fs_signed": self.fs_signed, "fs_kv_signed": self.fs_kv_signed}
        stored |= {f"stats[{role!r}]": t for role, t in self.stats.items()} | self.extras
        for name, value in stored.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ConflictMapError(
                    f"{name} has NaN/inf entries; diagnose again (the losses or gradients diverged)."
                )
        self._derive()

    # ------------------------------------------------------------------------------------------ derived scores
    def _derive(self) -> None:
        s = self.stats
        kv_of = AttentionGeometry(self.counts).kv_heads_of_query_heads()
        if self.kv_scoring == "shared":
            self.oc = oc_from(s["q"] + s["o"] + s["k"][:, kv_of] + s["v"][:, kv_of])
            self.oc_kv = self.fs_kv = self.score_kv = None
        else:
            self.oc = oc_from(s["q"] + s["o"])
            self.oc_kv = oc_from(s["k"] + s["v"])
            self.fs_kv = self.fs_kv_signed.abs()
            self.score_kv = combine_scores(self.oc_kv, self.fs_kv, self.combine, self.normalization)
        self.fs = self.fs_signed.abs()
        self.score = combine_scores(self.oc, self.fs, self.combine, self.normalization)

    def rescore(
        self, *, kv_scoring: str | None = None, combine: str | None = None, normalization: str | None = None
    ) -> ConflictMap:
        """The same measurements scored differently (no new diagnosis needed)."""
        return ConflictMap(
            self.counts,
            self.stats,
            self.fs_signed,
            fs_kv_signed=self.fs_kv_signed,
            kv_scoring=kv_scoring or self.kv_scoring,
            combine=combine or self.combine,
            normalization=normalization or self.normalization,
            metadata=self.metadata,
            extras=self.extras,
        )

    def __repr__(self) -> str:
        c = self.counts
        return (
            f"ConflictMap({c.model_type}: {c.num_layers} layers x {c.num_heads} heads ({c.num_kv_heads} KV), "
            f"kv_scoring={self.kv_scoring!r}, combine={self.combine!r}, normalization={self.normalization!r})"
        )

    # ------------------------------------------------------------------------------------------ selection
    def select(
        self,
        skip_ratio: float | None = None,
        skip_k: int | None = None,
        threshold: float | None = None,
        policy: str = "score",
        seed: int = 0,
    ) -> dict[int, list[int]]:
        """The heads to skip, ``{layer: [head, ...]}`` (query heads; layers without skips are left out).

        Give at most one budget: ``skip_ratio`` (fraction of all heads, rounded; default 0.1), ``skip_k`` (a count)
        or ``threshold`` (every head with ``score >= threshold``). ``policy`` picks which heads fill the budget:
        ``"score"`` (the highest scores), or the budget-matched controls ``"oc"``, ``"fs"`` (highest of that
        metric alone) and ``"random"`` (uniform, from ``seed``). Ties go to the lower (layer, head) index.
        """
        return select_units(self.score, self.oc, self.fs, skip_ratio, skip_k, threshold, policy, seed)

    def select_kv(
        self,
        skip_ratio: float | None = None,
        skip_k: int | None = None,
        threshold: float | None = None,
        policy: str = "score",
        seed: int = 0,
    ) -> dict[int, list[int]]:
        """KV heads to freeze, ``{layer: [kv head, ...]}``, from the KV-level scores (``kv_scoring="separate"``).

        Pass it to ``CASTLoraConfig(skip_kv_heads=...)``; same arguments as :meth:`select`.
        """
        if self.score_kv is None:
            raise ConfigError(
                "This map scores k/v inside each head (kv_scoring='shared'); use "
                "`cmap.rescore(kv_scoring='separate').select_kv(...)`, or select query heads with "
                "`select(...)` and let CASTLoraConfig's kv_head_policy decide the KV heads."
            )
        return select_units(self.score_kv, self.oc_kv, self.fs_kv, skip_ratio, skip_k, threshold, policy, seed)

    # ------------------------------------------------------------------------------------------ checks, comparison
    def check_compatible(self, model: Any) -> None:
        """Raise if ``model``'s attention geometry differs from the map's; warn if its config differs."""
        counts = AttentionGeometry.from_model(model).counts
        if counts != self.counts:
            raise ConflictMapError(
                f"This conflict map was made for {self.counts.to_dict()}, but the model is {counts.to_dict()}. "
                "Diagnose this model (cast_peft.diagnose) and use its own map."
            )
        made_for = self.metadata.get("model", {}).get("config_sha256")
        if made_for:
            from ..models import model_identity

            if model_identity(model)["config_sha256"] != made_for:
                from .._core.errors import CastWarning

                warnings.warn(
                    "The model's config differs from the one the map was made for (same head geometry). If it is "
                    "another checkpoint, diagnose it again.",
                    CastWarning,
                    stacklevel=2,
                )

    def stability(self, other: ConflictMap, skip_ratio: float = DEFAULT_SKIP_RATIO) -> dict[str, float]:
        """Agreement with a map of the same model from other data (e.g. the other half of a split).

        Returns Spearman correlations of ``oc``, ``fs`` and ``score`` and ``overlap``: the fraction of this map's
        ``select(skip_ratio)`` heads that ``other`` selects too.
        """
        if other.counts != self.counts:
            raise ConflictMapError("The maps belong to models with different head geometry.")
        mine = {(layer, h) for layer, hs in self.select(skip_ratio=skip_ratio).items() for h in hs}
        theirs = {(layer, h) for layer, hs in other.select(skip_ratio=skip_ratio).items() for h in hs}
        return {
            "spearman_oc": spearman(self.oc, other.oc),
            "spearman_fs": spearman(self.fs, other.fs),
            "spearman_score": spearman(self.score, other.score),
            "overlap": len(mine & theirs) / len(mine) if mine else math.nan,
        }

    def plot(
        self,
        path: str | os.PathLike,
        skip_ratio: float | None = DEFAULT_SKIP_RATIO,
        skip: Mapping[int, list[int]] | None = None,
    ) -> Path:
        """Heatmaps (layer x head) of OC, FS and score with the skipped heads marked, plus a per-layer summary.

        ``skip`` marks a given skip set; otherwise ``select(skip_ratio=...)`` (``None``: mark nothing). The format
        follows the file suffix (png, pdf, svg); written atomically. Returns the path.
        """
        from .plot import plot_map

        if skip is None:
            skip = {} if skip_ratio is None else self.select(skip_ratio=skip_ratio)
        return plot_map(self, Path(path), skip)

    # ------------------------------------------------------------------------------------------ save / load
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the map stores, by file name (derived scores included for readers without cast-peft)."""
        out = {f"stats_{role}": t for role, t in self.stats.items()}
        out |= {"fs_signed": self.fs_signed, "fs_kv_signed": self.fs_kv_signed}
        out |= {"oc": self.oc, "fs": self.fs, "score": self.score}
        out |= {f"extra.{name}": t for name, t in self.extras.items()}
        # Copies: safetensors refuses tensors that share memory (fs_signed is the Taylor extra itself, for one).
        return {name: t.detach().clone().contiguous() for name, t in out.items()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``conflict_map.safetensors`` and ``conflict_map.json`` into ``directory``, all or nothing.

        The files are written into a folder beside ``directory`` that is then swapped in, so an interrupted save
        leaves the previous map whole. An existing ``directory`` is replaced only if it holds a map (and nothing
        else); the JSON records the sha256 of the tensor file, so a mixed pair of files is detected on load.
        """
        meta = {
            "counts": self.counts.to_dict(),
            "kv_scoring": self.kv_scoring,
            "combine": self.combine,
            "normalization": self.normalization,
            "extras": sorted(self.extras),
            "metadata": self.metadata,
        }
        return write_map(directory, self.tensors(), meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConflictMap:
        """Load a map saved by :meth:`save`; a missing, partial, corrupt or foreign folder is a `ConflictMapError`."""
        stored = read_map(directory)
        try:
            return cls(stored.pop("counts"), stored.pop("stats"), stored.pop("fs_signed"), **stored)
        except (ValueError, TypeError) as err:
            if isinstance(err, ConflictMapError):
                raise
            raise ConflictMapError(
                f"{directory} holds an unreadable conflict map ({type(err).__name__}: {err}). Save it again."
            ) from None
