"""CAST for full fine-tuning: skipped heads' slices of the dense attention weights get exactly no update.

::

    from cast_peft import freeze_heads

    handle = freeze_heads(model, skip_heads={3: [0, 5]})   # on the plain model, before the first step and wrapping
    Trainer(model=model, ...).train()                       # any torch optimizer, DDP, FSDP2, grad checkpointing
    handle.save_pretrained("out/")                          # a plain checkpoint + cast_dense.json (the skip set)
    handle.remove()                                         # or unfreeze_heads(model): a plain transformers model

What is frozen is what the LoRA tuner freezes (one definition, :func:`cast_peft.geometry.frozen_units`): a skipped
head's q rows and q bias entries, its input columns of the output projection, and the k/v rows and bias entries of
KV heads frozen by ``kv_head_policy`` (or ``skip_kv_heads``). The slices come from
:meth:`~cast_peft.geometry.AttentionGeometry.role_index`, so fused qkv, GQA/MQA and Conv1D layouts need nothing here.

Mechanism, and why:

* The gradient of each frozen slice is set to exactly zero by a tensor hook on the parameter, so gradient clipping,
  gradient accumulation and the DDP all-reduce see the same gradient as a model in which those entries were not
  parameters at all; Adam's moments of those entries stay exactly zero.
* A zero gradient does not stop decoupled weight decay (AdamW multiplies every entry by ``1 - lr * wd``), momentum
  (SGD with momentum uses older gradients) or optimizers that rescale parameters. So after *every* step of *every*
  ``torch.optim.Optimizer`` holding a frozen parameter, the frozen slices are written back from a copy taken at
  :func:`freeze_heads` time. This is a global optimizer step hook (``torch.optim.optimizer.
  register_optimizer_step_post_hook``), so there is no step to remember: Trainer, TRL, accelerate, hand-written loops
  and optimizers made after freezing are all covered. The write-back is a copy of bits, so the slices are
  bit-identical to the base after any number of steps.
* A step *pre* hook zeroes the frozen gradient entries again before the update. It is what keeps FSDP2
  (``fully_shard``) exact: FSDP2 replaces each parameter by a sharded ``DTensor`` and writes its reduced gradient
  directly, so the tensor hooks do not fire there; both step hooks work on the local shard (``Shard(0)``). The one
  difference under FSDP2: gradient clipping, which runs before the step, still counts the frozen entries' gradients.

The alternatives were worse: a ``torch.nn.utils.parametrize`` parametrization (read frozen entries from a frozen copy)
renames every parameter (``...parametrizations.weight.original``), so Trainer checkpoints, ``save_pretrained``, FSDP
and optimizer state dicts stop being plain; splitting each weight into frozen and trainable parameters changes the
module types. Masking only the decay is not possible per entry with stock AdamW.

Cost: a copy of the frozen slices only, on the parameters' device. Measured on a Llama-3-8B-shaped model in bf16
(attention weights 2.68 GB): a random 10% skip set keeps 0.21 GB (8% of the attention weights; 0.40 GB with
``kv_head_policy="any"``), a 20% one 0.43 GB; a second copy of all attention weights would be 2.68 GB. Compute: one
``index_fill`` per frozen parameter per backward and one ``index_fill_`` plus one ``index_copy_`` per step. Parameter
names, types and the forward are the plain model's.

Limits: FSDP1 (``FullyShardedDataParallel``) flattens parameters into shards that no longer have rows and columns;
its first optimizer step is refused (`FrozenHeadsError`, before anything moves): use FSDP2 (``fully_shard``, or
``fsdp_version: 2`` in accelerate). Optimizers that do not derive from ``torch.optim.Optimizer`` (e.g. DeepSpeed's
fused ones) are not seen by the step hooks; :meth:`FrozenHeads.verify` detects any moved slice. Values written into a
frozen slice by hand (or a ``load_state_dict`` of other values) are reverted to the freeze-time values at the next
step; to change the base, ``remove()`` first.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._core.errors import CastError, ConfigError, FrozenHeadsError
from .._core.io import atomic_write_text
from ..geometry import AttentionGeometry, HeadCounts, frozen_units, is_conv1d


DENSE_CONFIG_NAME = "cast_dense.json"
_HANDLE_ATTR = "_cast_frozen_heads"


@dataclass
class FrozenSlice:
    """The frozen entries of one parameter: indices ``index`` along dimension ``dim``, and their values at freezing."""

    module: nn.Module
    param_name: str  # "weight" or "bias"
    path: str  # full parameter path, for messages
    dim: int
    index: torch.Tensor  # LongTensor of sorted feature indices
    values: torch.Tensor  # param.index_select(dim, index) at freeze time
    shape: torch.Size  # full (unsharded) shape of the parameter
    hook: Any = field(default=None, repr=False)

    def current(self) -> nn.Parameter | None:
        # Looked up on every step: FSDP2 replaces the Parameter objects (by sharded DTensors) after freezing.
        return self.module._parameters.get(self.param_name)

    def local(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(local tensor, start, stop)``: the locally stored part of ``tensor`` and the rows of dim 0 it holds."""
        placements = getattr(tensor, "placements", None)
        if placements is None:  # a plain tensor
            if tensor.shape != self.shape:
                raise FrozenHeadsError(
                    f"{self.path} has shape {tuple(tensor.shape)} but had {tuple(self.shape)} when its heads were "
                    f"frozen. FSDP1 (FullyShardedDataParallel) flattens parameters, so rows and columns cannot be "
                    f"kept: use FSDP2 (`fully_shard`, or fsdp_version 2 in accelerate / TrainingArguments.fsdp_config)."
                )
            return tensor, 0, self.shape[0]
        from torch.distributed.tensor import Shard

        mesh = tensor.device_mesh
        if mesh.ndim != 1 or tuple(placements) != (Shard(0),):
            raise FrozenHeadsError(
                f"{self.path} is a DTensor with placements {tuple(placements)} on a {mesh.ndim}-D mesh; frozen heads "
                f"support FSDP2's plain Shard(0) over one mesh dimension (fully_shard without HSDP)."
            )
        local = tensor.to_local()
        # FSDP2 shards dim 0 like torch.chunk: ceil(n / world) rows per rank, the last ranks possibly short or empty.
        chunk = math.ceil(self.shape[0] / mesh.size())
        start = min(mesh.get_local_rank() * chunk, self.shape[0])
        stop = min(start + chunk, self.shape[0])
        if local.shape[0] != stop - start:
            raise FrozenHeadsError(
                f"{self.path}: the local shard has {local.shape[0]} rows, expected {stop - start} (rows {start}-{stop} "
                f"of {self.shape[0]}); the sharding is not the one FSDP2 uses."
            )
        return local, start, stop

    def _local(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen indices into the local part (rows ``start:stop`` of dim 0) and the saved values they take."""
        if self.index.device != device:
            self.index = self.index.to(device)  # once, after model.to(...)
        if self.dim != 0:  # columns: every local row has them
            return self.index, self.values.narrow(0, start, stop - start)
        if start == 0 and stop == self.shape[0]:  # the whole parameter (not sharded)
            return self.index, self.values
        keep = (self.index >= start) & (self.index < stop)
        return self.index[keep] - start, self.values[keep]

    @torch.no_grad()
    def zero_grad_(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        grad, start, stop = self.local(param.grad)
        index, _ = self._local(start, stop, grad.device)
        grad.index_fill_(self.dim, index, 0)

    @torch.no_grad()
    def restore_(self, param: torch.Tensor) -> None:
        data, start, stop = self.local(param.data if getattr(param, "placements", None) is None else param)
        if self.values.device != data.device or self.values.dtype != data.dtype:
            self.values = self.values.to(device=data.device, dtype=data.dtype)  # once, after model.to(...)
        index, values = self._local(start, stop, data.device)
        data.index_copy_(self.dim, index, values)

    @torch.no_grad()
    def moved(self, param: torch.Tensor) -> int:
        """How many frozen entries of the local part of ``param`` differ from their values at freezing."""
        data, start, stop = self.local(param.data if getattr(param, "placements", None) is None else param)
        index, values = self._local(start, stop, data.device)
        values = values.to(device=data.device, dtype=data.dtype)
        # Bits, not values: -0.0 against 0.0, or a NaN, is a change too.
        return int((_bits(data.index_select(self.dim, index)) != _bits(values)).sum())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(dtype)


class FrozenHeads:
    """What :func:`freeze_heads` installed on a model; ``remove()`` takes it all off again."""

    def __init__(self, model: nn.Module, counts: HeadCounts, skip: dict[str, Any], slices: list[FrozenSlice]):
        self.model = model
        self.counts = counts
        self.skip_heads: dict[int, list[int]] = skip["skip_heads"]
        self.skip_kv_heads: dict[int, list[int]] | None = skip["skip_kv_heads"]
        self.kv_head_policy: str = skip["kv_head_policy"]
        self.slices = slices
        self.active = True

    # ------------------------------------------------------------------------------------------- optimizer hooks
    def _slices_in(self, optimizer: torch.optim.Optimizer) -> list[tuple[FrozenSlice, torch.Tensor]]:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        found = []
        for frozen in self.slices:
            param = frozen.current()
            if param is None:
                raise FrozenHeadsError(
                    f"{frozen.path} is no longer a parameter of its module, so its frozen heads cannot be kept. FSDP1 "
                    f"(FullyShardedDataParallel) replaces parameters by flat shards: use FSDP2 (`fully_shard`, or "
                    f"fsdp_version 2 in accelerate / TrainingArguments.fsdp_config)."
                )
            if id(param) in held:
                found.append((frozen, param))
        return found

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        for frozen, param in self._slices_in(optimizer):
            frozen.zero_grad_(param)

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for frozen, param in self._slices_in(optimizer):
            frozen.restore_(param)

    # ------------------------------------------------------------------------------------------- user API
    @property
    def num_frozen(self) -> int:
        """Number of frozen weight and bias entries."""
        return sum(s.values.numel() for s in self.slices)

    def config_dict(self) -> dict[str, Any]:
        """The skip set in the form ``cast_dense.json`` stores (the same fields as a CAST adapter's config)."""
        from .._core import __version__

        return {
            "skip_heads": {str(k): v for k, v in self.skip_heads.items()},
            "skip_kv_heads": None
            if self.skip_kv_heads is None
            else {str(k): v for k, v in self.skip_kv_heads.items()},
            "kv_head_policy": self.kv_head_policy,
            "attention_geometry": self.counts.to_dict(),
            "cast_peft_version": __version__,
        }

    def verify(self) -> dict[str, int]:
        """Check that every frozen slice still holds the bits it had at freezing; raise `FrozenHeadsError` otherwise.

        Under FSDP2 each rank checks its own shard. Returns the number of checked parameters and entries.
        """
        self._check_active()
        for frozen in self.slices:
            param = frozen.current()
            if param is None:
                raise FrozenHeadsError(f"{frozen.path} is no longer a parameter of the model.")
            bad = frozen.moved(param)
            if bad:
                raise FrozenHeadsError(
                    f"{frozen.path}: {bad} frozen entries changed. Was the weight written outside a torch optimizer "
                    f"step, or stepped by an optimizer that does not derive from torch.optim.Optimizer?"
                )
        return {"checked_parameters": len(self.slices), "frozen_entries": self.num_frozen}

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write the skip set to ``save_directory/cast_dense.json`` (atomically), e.g. beside ``trainer.save_model``."""
        path = Path(save_directory) / DENSE_CONFIG_NAME
        atomic_write_text(path, json.dumps(self.config_dict(), indent=2, sort_keys=True))
        return path

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``model.save_pretrained(save_directory, **kwargs)`` (a plain checkpoint) plus ``cast_dense.json``.

        The frozen slices are verified first, so a checkpoint whose skipped heads moved is never written.
        """
        self._check_active()
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ConfigError(f"{save_directory} is a file; pass a directory to save the model in.")
        self.verify()
        self.model.save_pretrained(save_directory, **kwargs)
        self.save_config(save_directory)

    def remove(self) -> None:
        """Write the frozen slices back one last time, take off every hook and forget the model: a plain model."""
        self._check_active()
        for frozen in self.slices:
            param = frozen.current()
            try:
                if param is not None:
                    frozen.restore_(param)
            except FrozenHeadsError:
                # Storage without rows and columns (FSDP1's flat shards): the step pre-hook refused the first step
                # on it, so nothing moved; still take the hooks off.
                pass
            if frozen.hook is not None:
                frozen.hook.remove()
                frozen.hook = None
        self.active = False
        _ACTIVE.discard(self)
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self.model = None
        _update_global_hooks()

    def _check_active(self) -> None:
        if not self.active:
            raise ConfigError("These frozen heads were removed already; call freeze_heads(model, ...) again.")

    def __reduce__(self) -> tuple:
        # A copy of a frozen model (copy.deepcopy, e.g. a reference model, or pickling) would carry a handle that no
        # step hook serves; the copy is a plain model instead, which can be frozen on its own.
        return (_no_handle, ())

    def __repr__(self) -> str:
        return f"FrozenHeads(skip_heads={self.skip_heads}, parameters={len(self.slices)}, entries={self.num_frozen})"


def _no_handle() -> None:
    return None


# Handles that are live; weak, so that a model (and its handle) that goes away unregisters itself.
_ACTIVE: weakref.WeakSet[FrozenHeads] = weakref.WeakSet()
_GLOBAL_HOOKS: list[Any] = []


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for handle in list(_ACTIVE):
        handle._before_step(optimizer)


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for handle in list(_ACTIVE):
        handle._after_step(optimizer)


def _update_global_hooks() -> None:
    # Global hooks fire for every torch.optim.Optimizer subclass, including ones built after freezing and the ones
    # accelerate wraps (public API since torch 2.0; checked against torch 2.13).
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    if len(_ACTIVE) and not _GLOBAL_HOOKS:
        _GLOBAL_HOOKS.extend(
            [register_optimizer_step_pre_hook(_pre_step), register_optimizer_step_post_hook(_post_step)]
        )
    elif not len(_ACTIVE):
        while _GLOBAL_HOOKS:
            _GLOBAL_HOOKS.pop().remove()


def freeze_heads(
    model: nn.Module,
    skip_heads: Any,
    *,
    skip_kv_heads: Any = None,
    kv_head_policy: str = "all",
    attention_geometry: Mapping[str, Any] | None = None,
) -> FrozenHeads:
    """Make the skipped heads' slices of ``model``'s attention weights receive exactly no update from any optimizer.

    Call it on the plain (unwrapped, unsharded) model, before DDP/FSDP wrapping; a Trainer does that wrapping later,
    so calling it before ``Trainer(...)`` is right. Which parameters train at all is still up to ``requires_grad``.

    Args:
        model: a transformers causal LM of a supported architecture (`cast_peft.LAYOUTS`), not quantized.
        skip_heads: ``{layer: [query head, ...]}`` (e.g. ``ConflictMap.select(skip_ratio=0.1)``).
        skip_kv_heads: ``{layer: [KV head, ...]}`` to freeze directly; replaces ``kv_head_policy``.
        kv_head_policy: ``"all"`` (freeze a KV head only when every query head of its group is skipped) or ``"any"``.
        attention_geometry: the head counts the skip set was made for (as ``cast_dense.json`` stores them); a model
            with other counts is refused.

    Returns:
        A :class:`FrozenHeads` handle: ``verify()``, ``save_pretrained(dir)``, ``save_config(dir)``, ``remove()``.
    """
    if model.__dict__.get(_HANDLE_ATTR) is not None:
        raise ConfigError(
            "This model already has frozen heads (freeze_heads was called on it). Call unfreeze_heads(model) first "
            "to change the skip set."
        )
    geometry = AttentionGeometry.from_model(model)
    if attention_geometry is not None and HeadCounts.from_dict(attention_geometry) != geometry.counts:
        raise ConfigError(
            f"This skip set was made for {dict(attention_geometry)}, but the model is {geometry.counts.to_dict()}. "
            f"Diagnose this model and take the skip set from its own conflict map."
        )
    skip = _validated_skip_set(geometry.counts, skip_heads, skip_kv_heads, kv_head_policy)
    modules = dict(model.named_modules())
    targets = [
        (layer, name, path, modules[path])
        for layer, paths in sorted(geometry.projections(model).items())
        for name, path in paths.items()
    ]
    for _, _, path, module in targets:  # every refusal before anything is installed
        _refuse_module(path, module)
    slices: list[FrozenSlice] = []
    for layer, name, path, module in targets:
        frozen = frozen_units(
            geometry.counts, layer, skip["skip_heads"], skip["skip_kv_heads"], skip["kv_head_policy"]
        )
        roles = geometry.layout.projections[name]
        index = torch.cat([geometry.role_index(name, role)[frozen[role]].reshape(-1) for role in roles]).sort().values
        if not index.numel():
            continue
        input_side = geometry.is_input_side(name)
        conv1d = is_conv1d(module)  # transformers Conv1D stores its weight (in, out)
        weight_dim = (0 if conv1d else 1) if input_side else (1 if conv1d else 0)
        params = [("weight", weight_dim)] + ([] if input_side or module.bias is None else [("bias", 0)])
        for param_name, dim in params:
            param = module._parameters[param_name]
            slices.append(
                FrozenSlice(
                    module=module,
                    param_name=param_name,
                    path=f"{path}.{param_name}",
                    dim=dim,
                    index=index,
                    values=param.detach().index_select(dim, index.to(param.device)).clone(),
                    shape=param.shape,
                )
            )
    for frozen in slices:
        param = frozen.current()
        # A parameter that does not train needs no gradient mask (and cannot take a hook); should it be unfrozen
        # later, the step pre-hook still zeroes its frozen gradient entries before every update.
        if param.requires_grad:
            frozen.hook = param.register_hook(_grad_mask(frozen.dim, frozen.index))
    handle = FrozenHeads(model, geometry.counts, skip, slices)
    model.__dict__[_HANDLE_ATTR] = handle
    _ACTIVE.add(handle)
    _update_global_hooks()
    return handle


def _grad_mask(dim: int, index: torch.Tensor):
    cache: dict[torch.device, torch.Tensor] = {}

    def mask(grad: torch.Tensor) -> torch.Tensor:
        if grad.device not in cache:
            cache[grad.device] = index.to(grad.device)
        return grad.index_fill(dim, cache[grad.device], 0)

    return mask


def unfreeze_heads(model: nn.Module) -> None:
    """Undo :func:`freeze_heads` on ``model`` (same as ``handle.remove()``)."""
    handle = frozen_heads_of(model)
    if handle is None:
        raise ConfigError("This model has no frozen heads; nothing to unfreeze.")
    handle.remove()


def frozen_heads_of(model: nn.Module) -> FrozenHeads | None:
    """The :class:`FrozenHeads` handle installed on ``model`` (or on the model a DDP/FSDP wrapper holds), if any."""
    for candidate in (model, getattr(model, "module", None)):
        if candidate is not None and candidate.__dict__.get(_HANDLE_ATTR) is not None:
            return candidate.__dict__[_HANDLE_ATTR]
    return None


def load_dense_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``cast_dense.json``: the keyword arguments to pass to :func:`freeze_heads` to continue training."""
    path = Path(directory) / DENSE_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; it is written by FrozenHeads.save_pretrained / save_config.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}); save the skip set again.") from None
    try:
        return {
            "skip_heads": data["skip_heads"],
            "skip_kv_heads": data.get("skip_kv_heads"),
            "kv_head_policy": data.get("kv_head_policy", "all"),
            "attention_geometry": data["attention_geometry"],
        }
    except (KeyError, TypeError):
        raise ConfigError(f"{path} lacks skip_heads or attention_geometry; save the skip set again.") from None


def _validated_skip_set(counts: HeadCounts, skip_heads: Any, skip_kv_heads: Any, kv_head_policy: str) -> dict:
    """The skip set normalised and checked against ``counts`` by the tuner's own validation (one place for it)."""
    from .config import CASTLoraConfig

    if skip_heads is None:
        raise ConfigError(
            "Pass skip_heads ({layer: [head, ...]}, e.g. ConflictMap.select(skip_ratio=0.1)); {} skips none."
        )
    try:
        config = CASTLoraConfig(
            skip_heads=skip_heads,
            skip_kv_heads=skip_kv_heads,
            kv_head_policy=kv_head_policy,
            attention_geometry=counts.to_dict(),
        )
    except CastError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {
        "skip_heads": config.skip_heads,
        "skip_kv_heads": config.skip_kv_heads,
        "kv_head_policy": config.kv_head_policy,
    }


def _refuse_module(path: str, module: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        raise ConfigError(
            f"{path} is a peft adapter layer. The dense mode fine-tunes the base weights themselves; for an adapter "
            f"use CASTLoraConfig, or call freeze_heads on the base model before (or instead of) get_peft_model."
        )
    for name, param in module.named_parameters(recurse=False):
        kind = type(param).__name__
        if kind in ("Params4bit", "Int8Params") or not param.dtype.is_floating_point:
            raise ConfigError(
                f"{path}.{name} is quantized ({kind}, {param.dtype}); full fine-tuning of quantized weights is not "
                f"possible. Load the model in bf16/fp32 for the dense mode, or train a CAST LoRA adapter "
                f"(CASTLoraConfig) on the quantized base."
            )
        if getattr(param, "placements", None) is not None:
            raise ConfigError(
                f"{path}.{name} is already sharded (a DTensor). Call freeze_heads on the plain model before FSDP "
                f"wrapping (a Trainer wraps it later, so before building the Trainer is right)."
            )
