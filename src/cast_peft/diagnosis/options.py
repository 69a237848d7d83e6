"""`DiagnosisOptions`: how a diagnosis tokenizes, accumulates and scores; one typed place shared by `diagnose`,
`Diagnosis` and the CLI (which reads its choices and defaults from the fields)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._core.errors import ConfigError
from ..conflict_map import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_KV_SCORING,
    DEFAULT_NORMALIZATION,
    KV_SCORINGS,
    NORMALIZATIONS,
)


SENSITIVITIES = ("taylor", "ablation")
ACCUMULATIONS = ("auto", "exact", "sketch")
HOOK_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DiagnosisOptions:
    """Options of a diagnosis (``diagnose(..., options=DiagnosisOptions(...))`` or the same names as keywords).

    > Data

    Args:
        batch_size (`int`, defaults to 8): examples per batch when the data are examples (``data.make_batches``).
        max_length (`int`, defaults to 256): tokens per example; lowered to the model's context (``n_positions`` /
            ``max_position_embeddings``) with a log line.

    > What is measured and how it is scored

    Args:
        sensitivity (`str`, defaults to `"taylor"`): ``"taylor"`` (free: same backward pass) or ``"ablation"``
            (exact; ``layers x heads`` extra forward passes per utility batch, ``ablation_chunk`` heads per pass).
        kv_scoring (`str`, defaults to `"separate"`): ``"separate"`` scores q/o per query head and k/v per KV head
            (``ConflictMap.select_kv``); ``"shared"`` puts head h's KV rows into θ_h (under GQA they dominate it).
        combine, normalization (`str`): how OC and FS make the score (default: product after min-max
            normalisation, the most stable skip set in ``benchmarks/map_stability.py``; ``ConflictMap.rescore``
            changes them later without diagnosing again).

    > Memory and speed

    Args:
        accumulation (`str`, defaults to `"auto"`): ``"exact"`` accumulators, a seeded ``"sketch"``, or ``"auto"``
            (exact when the whole planned peak fits; ``diagnosis.memory.plan_diagnosis_memory``).
        offload (`bool`): keep the accumulators in CPU memory.
        sketch_dim (`int`, defaults to 512): columns of the sketch.
        hook_precision (`str`, defaults to `"auto"`): input precision of the hooks' gradient GEMMs (``gᵀ x``,
            ``x S``), always with fp32 accumulation into fp32 sums. ``"fp32"``: fp32 inputs (as PyTorch's TF32 flag
            says; off by default); ``"bf16"``: inputs rounded to bf16 (a no-op for a bf16 model); ``"auto"``: bf16
            on CUDA devices with native bf16 (compute capability >= 8.0) when torch has bf16 -> fp32 GEMMs there
            (``torch.mm(..., out_dtype=torch.float32)``), fp32 elsewhere. Measured on
            SmolLM2-135M, fp32 model, 16 pairs per objective (``benchmarks/results/hook_precision.md``): bf16 inputs
            move the default OC by 1.6e-4 on average (max 1.0e-3), 1-3% of the sketch-512's error (1.4e-2, max
            5.5e-2), and leave the default skip set unchanged.
        memory_budget (`int`, *optional*): bytes per device beyond the loaded weights (default: 85% of free).
        ablation_chunk (`int`, defaults to 8): heads ablated per forward pass.
        max_tokens_per_pass (`int | "auto" | None`, defaults to `"auto"`): token budget of one forward/backward
            pass; batches are split into micro-batches of whole rows (gradients are sums: the map is the same up to
            fp32 summation order). ``"auto"``: whole batches when they fit, else the largest halving that does;
            ``None``: whole batches.

    > Run

    Args:
        seed (`int`): seed of the sketch matrix (the only randomness; the model runs in eval mode).
        progress (`bool`): tqdm progress bars (first process only).
    """

    batch_size: int = field(default=8, metadata={"help": "examples per batch (when the data are examples)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (cut to the model's context)"})
    sensitivity: str = field(
        default=SENSITIVITIES[0], metadata={"choices": SENSITIVITIES, "help": "FS: Taylor estimate or exact ablation"}
    )
    kv_scoring: str = field(
        default=DEFAULT_KV_SCORING,
        metadata={"choices": KV_SCORINGS, "help": "k/v scored per KV head ('separate') or inside each head"},
    )
    combine: str = field(default=DEFAULT_COMBINE, metadata={"choices": COMBINES, "help": "how OC and FS combine"})
    normalization: str = field(
        default=DEFAULT_NORMALIZATION, metadata={"choices": NORMALIZATIONS, "help": "OC/FS normalisation"}
    )
    accumulation: str = field(
        default=ACCUMULATIONS[0], metadata={"choices": ACCUMULATIONS, "help": "gradient accumulators"}
    )
    offload: bool = field(default=False, metadata={"help": "keep the accumulators in CPU memory"})
    sketch_dim: int = field(default=512, metadata={"help": "columns of the sketch"})
    hook_precision: str = field(
        default=HOOK_PRECISIONS[0],
        metadata={"choices": HOOK_PRECISIONS, "help": "input precision of the hooks' GEMMs (fp32 accumulation)"},
    )
    memory_budget: int | None = field(default=None, metadata={"help": "bytes per device beyond the weights"})
    ablation_chunk: int = field(default=8, metadata={"help": "heads ablated per forward pass"})
    max_tokens_per_pass: int | str | None = field(default="auto", metadata={"help": "token budget of one pass"})
    seed: int = field(default=0, metadata={"help": "seed of the sketch matrix"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {choices}.")
        for name in ("batch_size", "max_length", "sketch_dim", "ablation_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.")
        budget = self.max_tokens_per_pass
        if budget not in ("auto", None) and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ConfigError(f"max_tokens_per_pass={budget!r}: give a positive int, 'auto' or None.")
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget < 1):
            raise ConfigError(f"memory_budget={self.memory_budget!r} must be a positive number of bytes or None.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer.")

    @classmethod
    def resolve(cls, options: DiagnosisOptions | None, overrides: Mapping[str, Any]) -> DiagnosisOptions:
        """``options`` (default: the defaults) with keyword ``overrides`` applied; unknown names are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"Unknown diagnosis option(s) {unknown}; the options are {sorted(names)}.")
        if options is not None and not isinstance(options, cls):
            raise ConfigError(f"options must be a DiagnosisOptions, got {type(options).__name__}.")
        return dataclasses.replace(options or cls(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
