"""`diagnose()`: the head-level conflict map of a model between a safety and a utility objective.

For every attention head h (definitions in ``conflict_map.py`` and the README):

* ``G_s(h)``, ``G_u(h)``: gradients of the safety / utility calibration loss over θ_h (head h's q rows and bias,
  the k/v rows of its KV head, its o-projection input columns), summed in fp32 from module hooks (``gᵀ·x``), so base
  weights need no ``requires_grad`` and a bitsandbytes 4-bit base works;
* ``OC(h) = 1 − cos(G_s(h), G_u(h))``;
* ``FS(h)``: ``"taylor"``: ``|Σ_tokens ⟨a_h, ∂L_u/∂a_h⟩|`` at the o-projection input, taken in the same backward pass
  as the utility gradient; ``"ablation"``: ``|L_u(head h zeroed) − L_u|``, exact, batched over heads.

**Loss normalisation.** Each objective's loss is the token-weighted mean over the whole calibration set,
``L = (1/N) Σ_{response tokens t of the set} CE_t`` — not the mean of per-batch means — so the map does not depend on
the batch size, the padding or how the data is split over processes. Each backward pass differentiates the batch's
*sum* of token losses and the accumulated sums are divided by the set's ``N`` at the end; since gradients are linear
this is exactly ``∇L``.

**Memory.** ``accumulation="exact"`` keeps one fp32 copy of the attention weights' gradient per objective (2x the
attention weights in all; ``offload=True`` keeps it in CPU memory). ``"sketch"`` keeps, per unit, its ``[head_dim,
hidden]`` gradient block times a fixed seeded Gaussian ``[hidden, sketch_dim]`` matrix (exact on the head side,
Johnson-Lindenstrauss on the hidden side, unbiased inner products; biases and FS stay exact), i.e. ``sketch_dim /
hidden`` of the exact memory. Measured on SmolLM2-135M-Instruct (30 layers x 9 heads, hidden 576, 16 pairs per
objective; ``benchmarks/results/diagnosis_cost.md``), the OC error in cosine units with the default
``sketch_dim=512`` is 0.016 on average (max 0.11; Spearman 0.983 with the exact OC) for the default q/o OC, and 0.005
(max 0.025; Spearman 0.998) for k/v or q/k/v/o OC; with 256: 0.024 / 0.0066. ``"auto"``
(default) takes the exact path when the whole predicted peak of the run (``diagnosis.memory.plan_diagnosis_memory``:
weights, accumulators, activations, logits, ablation) fits on every device it uses (in ``memory_budget`` bytes
each, beyond the loaded weights, or in 85% of the free memory, PyTorch's reusable cache counted as free), else the
sketch; ``max_tokens_per_pass="auto"`` then splits batches into micro-batches until the plan fits. The plan is
logged before the first pass.

**Precision.** The hooks' GEMMs accumulate in fp32 into fp32 sums; ``hook_precision="auto"`` (default) gives them
bf16 inputs on CUDA devices with native bf16 (where fp32 GEMMs with TF32 off run at a fraction of the bf16 rate)
and fp32 inputs elsewhere. On SmolLM2-135M bf16 inputs move OC by 1.6e-4 on average
(max 1.0e-3), 1-3% of the sketch's error (``benchmarks/results/hook_precision.md``).

**Processes.** Under ``torch.distributed`` (e.g. ``accelerate launch``) each process takes every ``world_size``-th
batch (unless the data is a DataLoader already sharded by a ``DistributedSampler`` or accelerate); the sums are
all-reduced before scoring, so every process returns the same map as one process would (equal up to fp32 summation
order). An error on one process (NaN loss, ...) is raised on all of them at the final all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch import nn

from .._core.errors import CastWarning, DiagnosisError
from ..conflict_map import (
    ConflictMap,
)
from ..data import context_length, fit_max_length, prompt_format
from ..geometry import AttentionGeometry
from ..models import check_cpu_4bit_layout, local_cuda_index
from .ablation import IGNORE_INDEX, ablated_losses, ablation_units, row_losses
from .calibration import DEFAULT_CALIBRATION_SIZE, check_batch, digest, prepare_batches
from .hooks import (
    GradAccumulator,
    HookSession,
    TaylorAccumulator,
    execution_device,
    hooked_projections,
    unit_stats,
)
from .memory import choose_plan, rows_per_pass
from .options import DiagnosisOptions
from .self_targets import SelfTargets, resolve_utility_targets, self_target_batches


logger = logging.getLogger(__name__)

_RECORDED_OPTIONS = (
    "sensitivity",
    "kv_scoring",
    "combine",
    "normalization",
    "accumulation",
    "offload",
    "sketch_dim",
    "ablation_chunk",
    "hook_precision",
)
OBJECTIVES = ("safety", "utility")


def diagnose(
    model: nn.Module,
    tokenizer: Any = None,
    safety_data: Any = None,
    utility_data: Any = None,
    options: DiagnosisOptions | None = None,
    *,
    shard: bool | None = None,
    utility_targets: str | SelfTargets = "data",
    **overrides: Any,
) -> ConflictMap:
    """Diagnose every attention head of ``model``; returns a :class:`ConflictMap`.

    Args:
        model: a transformers causal LM of a supported architecture (fp32/bf16/fp16, or a bitsandbytes 4-bit base);
            a peft-wrapped model is diagnosed on its base weights. It is left as found (training mode,
            ``requires_grad`` flags), also on error.
        tokenizer: needed when the data are examples rather than tokenized batches.
        safety_data, utility_data: a list of examples in any form of ``cast_peft.data.EXAMPLE_FORMS`` (the forms
            TRL's SFTTrainer takes: ``{"prompt", "response"}`` or ``{"prompt", "completion"}`` pairs, loss on the
            response; ``{"messages"}`` conversations, loss on the assistant turns; plain strings or ``{"text"}``,
            loss on every token), a ``datasets.Dataset`` of those, a list of tokenized batches (``input_ids``,
            ``attention_mask``, ``labels`` with -100 on unscored tokens), or a DataLoader of batches. The
            tokenizer's prompt format (``cast_peft.data.prompt_format``) is recorded in ``metadata["prompt_format"]``.
        options: a :class:`DiagnosisOptions` (tokenization, sensitivity, scoring, memory, seed, progress); any of its
            fields can also be given as a keyword (``diagnose(..., sensitivity="ablation", seed=1)``).
        shard: split the batches over ``torch.distributed`` processes; ``None``: when distributed, unless the
            data is a DataLoader that is already sharded.
        utility_targets: ``"data"`` (default): the utility data's own responses. ``"self"`` or
            ``SelfTargets(max_new_tokens=128, batch_size=None, cache_dir=None)``: ``utility_data`` is a list of
            prompts (strings or ``{"prompt"}`` dicts) and the utility responses are the model's own greedy answers,
            generated once before any diagnosis pass (or read from ``cache_dir``); the settings, hashes and cache
            use are recorded in ``metadata["utility_targets"]`` (``diagnosis/self_targets.py``).
    """
    opts = DiagnosisOptions.resolve(options, overrides)
    self_targets = resolve_utility_targets(utility_targets)
    opts = dataclasses.replace(opts, max_length=fit_max_length(model, opts.max_length))  # GPT-2's position table
    batch_size, max_length = opts.batch_size, opts.max_length
    targets_metadata = None
    if self_targets is not None:
        # The safety data is checked first, so a bad set fails before the (minutes-long) generation.
        safety_data = prepare_batches(safety_data, tokenizer, batch_size, max_length, "safety")
        utility_data, targets_metadata = self_target_batches(model, tokenizer, utility_data, self_targets,
                                                             batch_size=batch_size, max_length=max_length,
                                                             progress=opts.progress)  # fmt: skip
    run = Diagnosis(model, opts)
    for objective, data in (("safety", safety_data), ("utility", utility_data)):
        run.add(objective, prepare_batches(data, tokenizer, batch_size, max_length, objective), shard=shard)
    cmap = run.conflict_map()
    if tokenizer is not None:
        cmap.metadata["prompt_format"] = prompt_format(tokenizer)  # so a map meets training data of its own format
    if targets_metadata is not None:
        cmap.metadata["utility_targets"] = targets_metadata
    return cmap


class Diagnosis:
    """An incremental diagnosis: add batches per objective, take the map (what :func:`diagnose` runs).

    Hooks are installed only while :meth:`add` runs. Without ``torch.distributed`` :meth:`conflict_map` can be
    called after any number of :meth:`add` calls (the stability benchmark grows the calibration set this way);
    with several processes it all-reduces the sums in place and ends the run. Arguments as in :func:`diagnose`.
    """

    def __init__(self, model: nn.Module, options: DiagnosisOptions | None = None, **overrides: Any):
        opts = self.opts = DiagnosisOptions.resolve(options, overrides)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "get_output_embeddings", lambda: None)() is None:
            raise DiagnosisError(
                f"{type(base).__name__} has no language-model head (a bare transformer, as AutoModel loads), so it "
                "has no loss to diagnose. Load the model with AutoModelForCausalLM.from_pretrained(...)."
            )
        self.model, self.seed, self.progress = model, opts.seed, opts.progress
        self.context = context_length(model)
        self.geometry = AttentionGeometry.from_model(model)
        check_cpu_4bit_layout(model)
        self.projections = hooked_projections(model, self.geometry)
        # What the map's metadata records of the options (the run-only ones, memory_budget and progress, aside).
        self.options = {key: getattr(opts, key) for key in _RECORDED_OPTIONS}
        self.mode, self.tokens_per_pass = self._choose_mode(
            opts.accumulation, opts.memory_budget, opts.max_tokens_per_pass, opts.batch_size, opts.max_length
        )
        self.options["accumulation_used"] = self.mode
        self.options["tokens_per_pass"] = self.tokens_per_pass
        sketch = opts.sketch_dim if self.mode == "sketch" else None
        self.grads = {
            obj: GradAccumulator(
                self.projections,
                self.geometry,
                sketch_dim=sketch,
                seed=opts.seed,
                offload=opts.offload,
                hook_precision=opts.hook_precision,
            )
            for obj in OBJECTIVES
        }
        used = {
            str(device): str(dtype).removeprefix("torch.") for device, dtype in self.grads["safety"].dtypes.items()
        }
        self.options["hook_precision_used"] = used  # per device: "auto" differs between CPU and CUDA
        self._o = [p for p in self.projections if p.input_side]
        self.taylor = TaylorAccumulator(self.geometry, self._o[0].name)
        kv_groups = opts.kv_scoring == "separate" and self.geometry.counts.group_size > 1
        self._units = ablation_units(self.geometry, kv_groups=kv_groups)
        self.ablated = torch.zeros(len(self._units), dtype=torch.float64)
        self.sizes = {obj: {"examples": 0, "batches": 0, "tokens": 0, "response_tokens": 0} for obj in OBJECTIVES}
        self.loss_sums = dict.fromkeys(OBJECTIVES, 0.0)
        self.digests: dict[str, list[tuple[int, str]]] = {obj: [] for obj in OBJECTIVES}
        self.errors: list[str] = []
        self._finished = False

    # ------------------------------------------------------------------------------------------------ memory
    def _choose_mode(
        self,
        accumulation: str,
        budget: int | None,
        max_tokens_per_pass: int | str | None,
        batch_size: int,
        max_length: int,
    ) -> tuple[str, int | None]:
        """``(accumulation, token budget per pass)`` from the memory plan; logs the plan's predicted peak."""
        options = {key: self.options[key] for key in ("sketch_dim", "offload", "sensitivity", "ablation_chunk")}
        plan, fits = choose_plan(
            self.model,
            accumulation=accumulation,
            max_tokens_per_pass=max_tokens_per_pass,
            memory_budget=budget,
            batch_size=batch_size,
            max_length=max_length,
            **options,
        )
        message = f"diagnosis memory plan ({batch_size} x {max_length} tokens per batch): {plan.summary()}"
        if not fits:
            logger.warning(
                "%s exceeds the free memory (or memory_budget): lower max_length, or use offload=True", message
            )
        else:
            logger.info(message)
            if self.progress and _dist_rank_world()[0] == 0:  # shown with the progress bars (the CLI's default)
                from tqdm.auto import tqdm

                tqdm.write(message, file=sys.stderr)
        self.plan = plan
        tokens = None if max_tokens_per_pass is None else plan.tokens_per_pass
        if isinstance(max_tokens_per_pass, int):
            tokens = max_tokens_per_pass
        return plan.accumulation, tokens

    # ------------------------------------------------------------------------------------------------ passes
    def add(self, objective: str, batches: Iterable[Mapping[str, torch.Tensor]], *, shard: bool | None = None) -> None:
        """Run the forward/backward passes of ``batches`` for ``objective`` (``"safety"`` or ``"utility"``)."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; use 'safety' or 'utility'.")
        if self._finished:
            raise RuntimeError("This multi-process diagnosis was already reduced by conflict_map(); start a new one.")
        if self.errors:
            return  # a process that failed keeps quiet until the collective step raises everywhere
        rank, world = _dist_rank_world()
        if shard is None:
            shard = world > 1 and not _already_sharded(batches)
        utility = objective == "utility"
        accumulate_ablation = utility and self.options["sensitivity"] == "ablation"
        session = HookSession(self.model, self.projections, self.grads[objective], self.taylor if utility else None)
        device = _input_device(self.model)
        vocab = self.model.get_input_embeddings().num_embeddings
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        bar = tqdm(batches, total=total, desc=f"diagnose {objective}", disable=not self.progress or rank != 0)
        seen = 0
        with session:
            for index, raw in enumerate(bar):
                seen += 1
                if shard and index % world != rank:
                    continue
                try:
                    self._pass(objective, index, raw, session, device, vocab, accumulate_ablation)
                except (DiagnosisError, ValueError) as err:
                    if world == 1:
                        raise
                    self.errors.append(f"process {rank}: {err}")
                    return
        if seen == 0:
            raise ValueError(f"The {objective} data yielded no batches; give at least one example.")

    def _pass(
        self,
        objective: str,
        index: int,
        raw: Mapping[str, torch.Tensor],
        session: HookSession,
        device: torch.device,
        vocab: int,
        accumulate_ablation: bool,
    ) -> None:
        batch = check_batch(raw, objective, index, vocab, self.context)
        self.digests[objective].append((index, digest(batch)))
        batch = {key: value.to(device) for key, value in batch.items()}
        rows, length = batch["input_ids"].shape
        step = rows_per_pass(self.tokens_per_pass, rows, length)
        parts = []
        for start in range(0, rows, step):  # micro-batches of whole rows: the sums are the same
            micro = {key: value[start : start + step] for key, value in batch.items()}
            losses = row_losses(self.model, micro)
            loss = losses.sum()
            if not torch.isfinite(loss):
                raise DiagnosisError(
                    f"The {objective} loss of batch {index} is {float(loss.detach())} (NaN/inf). Check that "
                    "batch's data and the model's dtype (fp16 overflows; use bf16 or fp32)."
                )
            loss.backward()
            if not session.gradients_finite():
                raise DiagnosisError(
                    f"A gradient of the {objective} loss in batch {index} is NaN/inf (the loss was "
                    f"finite: {float(loss.detach()):.4g}). Use bf16/fp32 compute, or drop that batch."
                )
            parts.append(losses.detach())
            if accumulate_ablation:
                self._ablate(micro)
        losses = torch.cat(parts)
        size = self.sizes[objective]
        size["batches"] += 1
        size["examples"] += batch["input_ids"].shape[0]
        size["tokens"] += int(batch["attention_mask"].sum())
        size["response_tokens"] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.loss_sums[objective] += float(losses.detach().double().sum())

    def _ablate(self, batch: Mapping[str, torch.Tensor]) -> None:
        o_modules = {p.layer: p.module for p in self._o}
        o_index = self.geometry.role_index(self._o[0].name, "o")
        # Runs under no_grad, so the gradient hooks stay idle.
        self.ablated += ablated_losses(
            self.model,
            o_modules,
            self._o[0].in_features,
            o_index,
            batch,
            self._units,
            self.options["ablation_chunk"],
        )

    # ------------------------------------------------------------------------------------------------ result
    def conflict_map(self) -> ConflictMap:
        """The map from everything added so far (all-reduced over processes when distributed)."""
        _, world = _dist_rank_world()
        if world > 1:
            self._reduce()
        if self.errors:
            raise DiagnosisError("; ".join(self.errors))
        for objective in OBJECTIVES:
            if self.sizes[objective]["response_tokens"] == 0:
                raise ValueError(
                    f"No {objective} response tokens were scored; add {objective} data whose labels are "
                    "not all -100 (the response part of each example)."
                )
        fewest = min(self.sizes[objective]["examples"] for objective in OBJECTIVES)
        if fewest < DEFAULT_CALIBRATION_SIZE:
            logger.warning(
                "The map comes from %d calibration examples per objective (fewer than %d): expect a noisy "
                "map and an unstable skip set; pass at least %d examples of each objective.",
                fewest,
                DEFAULT_CALIBRATION_SIZE,
                DEFAULT_CALIBRATION_SIZE,
            )
        n_s = self.sizes["safety"]["response_tokens"]
        n_u = self.sizes["utility"]["response_tokens"]
        stats = unit_stats(self.grads["safety"], self.grads["utility"])
        scale = torch.tensor([1 / n_s**2, 1 / n_u**2, 1 / (n_s * n_u)], dtype=torch.float64)
        stats = {role: value * scale for role, value in stats.items()}
        taylor = -self.taylor.values / n_u  # first-order estimate of L_u(head ablated) - L_u
        extras = {"taylor_signed": taylor}
        fs_kv = None
        if self.options["sensitivity"] == "ablation":
            base = self.loss_sums["utility"]
            deltas = (self.ablated - base) / n_u
            counts = self.geometry.counts
            n_heads = counts.num_layers * counts.num_heads
            fs = deltas[:n_heads].view(counts.num_layers, counts.num_heads)
            if len(self._units) > n_heads:
                fs_kv = deltas[n_heads:].view(counts.num_layers, counts.num_kv_heads)
        else:
            fs = taylor
        return ConflictMap(
            self.geometry.counts,
            stats,
            fs,
            fs_kv_signed=fs_kv,
            kv_scoring=self.options["kv_scoring"],
            combine=self.options["combine"],
            normalization=self.options["normalization"],
            metadata=self._metadata(),
            extras=extras,
        )

    def _reduce(self) -> None:
        import torch.distributed as dist

        values = self.taylor.values
        tensors = [t for acc in self.grads.values() for t in acc.tensors()] + [values, self.ablated]
        staging = _staging_device(dist.get_backend(), [t.device for t in tensors])
        # NCCL's all_gather_object pickles through a tensor on the *current* CUDA device: cuda:0 on every rank under
        # plain torchrun without torch.cuda.set_device, i.e. a duplicate-GPU error or a hang.
        with torch.cuda.device(staging) if staging is not None else contextlib.nullcontext():
            gathered: list[Any] = [None] * dist.get_world_size()
            state = {"errors": self.errors, "sizes": self.sizes, "losses": self.loss_sums, "digests": self.digests}
            dist.all_gather_object(gathered, state)
            self.errors = [e for part in gathered for e in part["errors"]]
            self._finished = True
            if self.errors:
                return
            for objective in OBJECTIVES:
                size = self.sizes[objective]
                self.sizes[objective] = {k: sum(p["sizes"][objective][k] for p in gathered) for k in size}
                self.loss_sums[objective] = math.fsum(p["losses"][objective] for p in gathered)
                self.digests[objective] = sorted(d for p in gathered for d in p["digests"][objective])
            for tensor in tensors:
                _all_reduce_(tensor, staging)
        self.taylor = _Fixed(values)

    def _metadata(self) -> dict[str, Any]:
        from ..models import model_identity

        data = {}
        for objective in OBJECTIVES:
            digest = hashlib.sha256()
            for index, item in sorted(self.digests[objective]):
                digest.update(f"{index}:{item};".encode())
            size = self.sizes[objective]
            data[objective] = {
                **size,
                "sha256": digest.hexdigest(),
                "mean_loss": self.loss_sums[objective] / max(size["response_tokens"], 1),
            }
        versions = {}
        for dist_name in ("torch", "transformers", "peft", "cast-peft", "bitsandbytes", "accelerate"):
            try:
                versions[dist_name] = importlib_metadata.version(dist_name)
            except importlib_metadata.PackageNotFoundError:
                versions[dist_name] = None
        return {
            "model": model_identity(self.model),
            "counts": self.geometry.counts.to_dict(),
            "data": data,
            "options": dict(self.options),
            "seed": self.seed,
            "versions": versions,
            "loss": "token-weighted mean over the calibration set's response tokens",
            "world_size": _dist_rank_world()[1],
        }


class _Fixed:
    """Stand-in for a TaylorAccumulator after the all-reduce: just the summed values."""

    def __init__(self, values: torch.Tensor):
        self.values = values


def _input_device(model: nn.Module) -> torch.device:
    return execution_device(model.get_input_embeddings())


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:
        # torchrun / accelerate launch set WORLD_SIZE but start no process group; accelerate's PartialState() starts
        # none on CPU unless cpu=True (accelerate 1.15). Without one the batches cannot be split.
        warnings.warn(
            f"WORLD_SIZE={launched} but torch.distributed is not initialized, so each of the {launched} processes "
            f"diagnoses every batch: the same map at {launched} times the work. Start the process group before "
            "diagnosing: `accelerate.PartialState()` (`PartialState(cpu=True)` on CPU) or "
            "`torch.distributed.init_process_group()`.",
            CastWarning,
            stacklevel=1,  # this line: Python's default filter then shows it once per process
        )
    return 0, 1


def _already_sharded(batches: Any) -> bool:
    """A DataLoader with a DistributedSampler, or one prepared by accelerate (it shards itself)."""
    if not isinstance(batches, torch.utils.data.DataLoader):
        return False
    sampler = getattr(batches, "sampler", None)
    batch_sampler = getattr(batches, "batch_sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        return True
    names = {type(batches).__name__, type(batch_sampler).__name__}
    return bool(names & {"DataLoaderShard", "DataLoaderDispatcher", "BatchSamplerShard"})


def _staging_device(backend: str, devices: list[torch.device]) -> torch.device | None:
    """The device the collectives run on: ``None`` (in place) unless the backend is NCCL, which needs this rank's
    own GPU: the first accumulator's CUDA device, else (accumulators in CPU memory) ``LOCAL_RANK``'s GPU."""
    if backend != "nccl":
        return None
    for device in devices:
        if device.type == "cuda":
            return device
    return torch.device("cuda", local_cuda_index())


def _all_reduce_(tensor: torch.Tensor, staging: torch.device | None) -> None:
    """Sum ``tensor`` over processes in place, through a copy on ``staging`` when it lives elsewhere."""
    import torch.distributed as dist

    if staging is None or tensor.device == staging:
        dist.all_reduce(tensor)
    else:
        staged = tensor.to(staging)
        dist.all_reduce(staged)
        tensor.copy_(staged)
