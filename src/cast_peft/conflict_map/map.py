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

import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._core.errors import CastWarning, ConfigError, ConflictMapError
from .._core.io import output_folder, pause_point, sha256_file
from ..geometry import ROLES, AttentionGeometry, HeadCounts


FORMAT = "cast-peft/conflict-map"
FORMAT_VERSION = 1
TENSORS_FILE = "conflict_map.safetensors"
META_FILE = "conflict_map.json"
KV_SCORINGS = ("shared", "separate")
COMBINES = ("product", "sum", "oc", "fs")
NORMALIZATIONS = ("rank", "minmax")
POLICIES = ("score", "oc", "fs", "random")
DEFAULT_SKIP_RATIO = 0.1
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
        raise ValueError(f"{name}={value!r} is not one of {allowed}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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


def _oc_from(stats: torch.Tensor) -> torch.Tensor:
    ss, uu, su = stats.unbind(-1)
    denom = (ss * uu).sqrt()
    # A block with a zero gradient for either objective has no direction: treat it as orthogonal (OC = 1).
    cos = torch.where(denom > 0, su / denom.clamp_min(1e-300), torch.zeros_like(su))
    return 1 - cos.clamp(-1, 1)


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
            self.oc = _oc_from(s["q"] + s["o"] + s["k"][:, kv_of] + s["v"][:, kv_of])
            self.oc_kv = self.fs_kv = self.score_kv = None
        else:
            self.oc = _oc_from(s["q"] + s["o"])
            self.oc_kv = _oc_from(s["k"] + s["v"])
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
        return self._select(self.score, self.oc, self.fs, skip_ratio, skip_k, threshold, policy, seed)

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
        return self._select(self.score_kv, self.oc_kv, self.fs_kv, skip_ratio, skip_k, threshold, policy, seed)

    @staticmethod
    def _select(score, oc, fs, skip_ratio, skip_k, threshold, policy, seed) -> dict[int, list[int]]:
        _choice("policy", policy, POLICIES)
        given = [
            name
            for name, v in (("skip_ratio", skip_ratio), ("skip_k", skip_k), ("threshold", threshold))
            if v is not None
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
        from safetensors.torch import save_file

        tensors = self.tensors()
        with output_folder(directory, command="ConflictMap.save", overwrite=True,
                           replaceable=(TENSORS_FILE, META_FILE)) as tmp:  # fmt: skip
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
            pause_point("map-between-files")
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "counts": self.counts.to_dict(),
                "kv_scoring": self.kv_scoring,
                "combine": self.combine,
                "normalization": self.normalization,
                "tensors_sha256": sha256_file(tmp / TENSORS_FILE),
                "extras": sorted(self.extras),
                "metadata": self.metadata,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConflictMap:
        """Load a map saved by :meth:`save`; a missing, partial, corrupt or foreign folder is a `ConflictMapError`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not directory.is_dir():
            raise ConflictMapError(f"{directory} is not a folder; pass the folder given to ConflictMap.save().")
        if not meta_path.is_file():
            hint = " (the tensors are there: the save was interrupted)" if tensor_path.exists() else ""
            raise ConflictMapError(
                f"{directory} has no {META_FILE}{hint}; it is not a saved conflict map. Diagnose again and save it."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConflictMapError(
                f"{meta_path} is not valid JSON ({err}); the file is corrupt. Save the map again."
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConflictMapError(
                f"{meta_path} is not a cast-peft conflict map (format "
                f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})."
            )
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ConflictMapError(
                f"{directory} was written by a newer cast-peft (format version "
                f"{meta['format_version']} > {FORMAT_VERSION}); upgrade cast-peft."
            )
        if not tensor_path.is_file():
            raise ConflictMapError(f"{directory} lacks {TENSORS_FILE}: the map is incomplete. Save it again.")
        if sha256_file(tensor_path) != meta.get("tensors_sha256"):
            raise ConflictMapError(
                f"{tensor_path} does not match {META_FILE} (checksum differs): the files are "
                "corrupt or from different saves. Save the map again."
            )
        try:
            tensors = load_file(str(tensor_path))
            counts = HeadCounts.from_dict(meta["counts"])
            return cls(
                counts,
                {role: tensors[f"stats_{role}"] for role in ROLES},
                tensors["fs_signed"],
                fs_kv_signed=tensors.get("fs_kv_signed"),
                kv_scoring=meta["kv_scoring"],
                combine=meta["combine"],
                normalization=meta["normalization"],
                metadata=meta.get("metadata", {}),
                extras={name: tensors[f"extra.{name}"] for name in meta.get("extras", [])},
            )
        except (SafetensorError, KeyError, ValueError, TypeError) as err:
            if isinstance(err, ConflictMapError):
                raise
            raise ConflictMapError(
                f"{directory} holds an unreadable conflict map ({type(err).__name__}: {err}). Save it again."
            ) from None
