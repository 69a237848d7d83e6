"""Checks users run on a CAST model: what is frozen, effective trainable parameters, frozen-head verification.

What "frozen" means, exactly (DESIGN.md invariant 7): for each skipped query head h of a layer, the adapter never
changes h's rows of W_q (and of the q bias), h's input columns of W_o, and the rows of W_k/W_v (and their biases) of
the KV head h reads *only when that KV head is frozen* (``kv_head_policy`` / ``skip_kv_heads`` of the config). Under
GQA/MQA a skipped head whose KV head is not frozen reads keys and values that train, and every head's input changes
once an earlier layer is tuned: a skipped head's weights are bit-identical to the base, its output is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._core.errors import FrozenHeadsError
from ..geometry import is_conv1d
from .layers import HeadMaskedLinear, cast_layers


_REOPEN = (
    "Open a CAST adapter folder with `PeftModel.from_pretrained(base, folder, is_trainable=True)` (cast-peft imported) "
    "or pass `config=CASTLoraConfig.from_pretrained(folder)`; build new adapters with `get_peft_model(model, "
    "CASTLoraConfig(...))`."
)


def count_effective_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters with masked (always-zero) LoRA entries excluded.

    Returns ``{"trainable": ..., "effective": ..., "masked": ...}``; ``trainable`` is what peft's
    ``print_trainable_parameters`` counts.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = 0
    for module in model.modules():
        if isinstance(module, HeadMaskedLinear) and module.weight.requires_grad:
            masked += int((~module.weight_mask.expand_as(module.weight)).sum())
    return {"trainable": trainable, "effective": trainable - masked, "masked": masked}


def _cast_configs(model: nn.Module) -> dict[str, Any]:
    """``{adapter name: CASTLoraConfig}`` of the bound CAST adapters a (peft) model holds."""
    from .config import CASTLoraConfig

    configs = getattr(model, "peft_config", None) or {}
    return {
        name: config
        for name, config in configs.items()
        if isinstance(config, CASTLoraConfig) and config.attention_geometry is not None
    }


def describe_frozen(model_or_config: Any, adapter_name: str | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """What a skip set freezes, counted per head and printed in one line (like peft's ``print_trainable_parameters``).

    For each skipped query head the adapter leaves its q rows (and q bias) and its o columns unchanged; a KV head's
    k/v rows (and biases) are frozen only when the config freezes that KV head (``kv_head_policy``: by default when
    every query head of its group is skipped; or ``skip_kv_heads``). A skipped head whose KV head is not frozen
    reads keys and values that train, so its output changes even though its own weights do not.

    Args:
        model_or_config: a bound ``CASTLoraConfig`` or a peft model holding one.
        adapter_name: which adapter of a peft model (default: its active adapter).
        verbose: print the summary line.

    Returns:
        ``{"skipped_query_heads", "query_heads", "frozen_kv_heads", "kv_heads", "skipped_heads_reading_trained_kv",
        "frozen_q_rows", "frozen_o_columns", "frozen_kv_rows", "layers"}``; rows and columns are counted per base
        weight (k and v each have ``frozen_kv_rows`` frozen rows); ``layers`` maps each layer with skips to its
        ``{"query_heads", "kv_heads", "reading_trained_kv"}`` lists.
    """
    from .config import CASTLoraConfig

    config = model_or_config
    if not isinstance(config, CASTLoraConfig):
        configs = _cast_configs(model_or_config)
        if adapter_name is None:
            active = getattr(model_or_config, "active_adapter", None)
            adapter_name = active if active in configs else next(iter(configs), None)
        if adapter_name not in configs:
            raise FrozenHeadsError(
                f"{type(model_or_config).__name__} holds no bound CAST adapter"
                f"{'' if adapter_name is None else f' named {adapter_name!r}'}, so nothing is frozen. {_REOPEN}"
            )
        config = configs[adapter_name]
    counts, kv_of = config.counts, config.geometry.kv_heads_of_query_heads()
    layers: dict[int, dict[str, list[int]]] = {}
    for layer in range(counts.num_layers):
        units = config.enabled_units(layer)
        heads = (~units["q"]).nonzero().flatten().tolist()
        kv_heads = (~units["k"]).nonzero().flatten().tolist()
        if heads or kv_heads:
            reading = [h for h in heads if bool(units["k"][kv_of[h]])]
            layers[layer] = {"query_heads": heads, "kv_heads": kv_heads, "reading_trained_kv": reading}
    skipped = sum(len(entry["query_heads"]) for entry in layers.values())
    frozen_kv = sum(len(entry["kv_heads"]) for entry in layers.values())
    summary = {
        "skipped_query_heads": skipped,
        "query_heads": counts.num_layers * counts.num_heads,
        "frozen_kv_heads": frozen_kv,
        "kv_heads": counts.num_layers * counts.num_kv_heads,
        "skipped_heads_reading_trained_kv": sum(len(entry["reading_trained_kv"]) for entry in layers.values()),
        "frozen_q_rows": skipped * counts.head_dim,
        "frozen_o_columns": skipped * counts.head_dim,
        "frozen_kv_rows": frozen_kv * counts.head_dim,
        "layers": layers,
    }
    if verbose:
        print(
            f"skipped query heads: {skipped} / {summary['query_heads']} (q rows + o columns frozen) || "
            f"frozen KV heads: {frozen_kv} / {summary['kv_heads']} (k/v rows frozen) || "
            f"skipped heads reading a training KV head: {summary['skipped_heads_reading_trained_kv']}"
        )
    return summary


def _frozen_slices(config: Any, path: str) -> list[tuple[str, torch.Tensor]]:
    """``[(side, feature indices)]`` of projection ``path`` that ``config`` freezes (``side`` "out": rows)."""
    geometry = config.geometry
    ref = geometry.parse(path)
    if ref is None:
        return []
    units = config.enabled_units(ref.layer)
    slices = []
    for role in ref.roles:
        frozen = (~units[role]).nonzero().flatten()
        if len(frozen):
            side = "in" if ref.input_side else "out"
            slices.append((side, geometry.role_index(ref.name, role)[frozen].reshape(-1)))
    return slices


def _reference_tensors(reference: nn.Module | Mapping[str, torch.Tensor], geometry: Any) -> dict[tuple, torch.Tensor]:
    """``{(layer, projection, "weight" | "bias"): tensor}`` of the attention projections of a base model / state dict."""
    state = reference.state_dict() if isinstance(reference, nn.Module) else reference
    found = {}
    for key, tensor in state.items():
        module_path, _, kind = key.rpartition(".")
        ref = geometry.parse(module_path.removesuffix(".base_layer"))
        if ref is not None and kind in ("weight", "bias"):
            found[(ref.layer, ref.name, kind)] = tensor
    return found


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    # transformers Conv1D (GPT-2) stores its weight as (in, out).
    return tensor.T if is_conv1d(module) and tensor.dim() == 2 else tensor


@torch.no_grad()
def verify_frozen_heads(
    model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor] | None = None, *, config: Any = None
) -> dict[str, int]:
    """Check that the model cannot have changed, and has not changed, any skipped head; raise ``FrozenHeadsError``.

    For every CAST adapter the model holds (or ``config``, e.g. for a merged model), every attention projection with
    frozen features (see the module docstring for the exact set) must carry the head mask the config implies, and the
    masked LoRA slices must be exactly zero. A model holding a CAST config whose masks are missing (so training moves
    skipped heads) fails, as does a model holding no CAST adapter at all. With ``reference`` (the base model or its
    state dict), the base weights' (and biases') frozen slices are also compared with it bit for bit.

    Under FSDP2 (``fully_shard``) call it on every rank: sharded weights are gathered one at a time (a collective).

    Returns ``{"checked_factors", "masked_entries", "checked_base_entries"}``.
    """
    configs = {"config": config} if config is not None else _cast_configs(model)
    masked_layers = cast_layers(model)
    if not configs and not masked_layers:
        raise FrozenHeadsError(f"{type(model).__name__} holds no CAST adapter, so no head is frozen. {_REOPEN}")
    modules = dict(model.named_modules())
    checked = masked = base_entries = 0
    seen: set[int] = set()
    for adapter, cast_config in configs.items():
        if not any(cast_config.skip_heads.values()) and not any((cast_config.skip_kv_heads or {}).values()):
            continue
        geometry = cast_config.geometry
        reference_tensors = None if reference is None else _reference_tensors(reference, geometry)
        for path, module in modules.items():
            slices = _frozen_slices(cast_config, path)
            if not slices:
                continue
            lora_a = getattr(module, "lora_A", None)
            if config is None and lora_a is not None and adapter in lora_a:
                checked_here, masked_here = _check_lora_layer(module, adapter, cast_config, path)
                checked, masked = checked + checked_here, masked + masked_here
                seen.add(id(module))
            if reference_tensors is not None:
                base_entries += _compare_base(module, path, slices, reference_tensors, geometry)
    # Masks installed by adapters not listed in peft_config (or with no config at all): their own slices must be zero.
    for name, layer in masked_layers.items():
        if id(layer) in seen:
            continue
        for factors in (layer.lora_A, layer.lora_B):
            for adapter, factor in factors.items():
                if isinstance(factor, HeadMaskedLinear) and (adapter not in configs):
                    weight = _whole(factor.weight)
                    masked += _check_zero(weight, ~factor.weight_mask.expand_as(weight), name, adapter)
                    checked += 1
    return {"checked_factors": checked, "masked_entries": masked, "checked_base_entries": base_entries}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or gathered when it is a sharded DTensor (FSDP2): indexing a DTensor with a plain mask fails."""
    return tensor if getattr(tensor, "placements", None) is None else tensor.full_tensor()


def _check_zero(weight: torch.Tensor, off: torch.Tensor, path: str, adapter: str) -> int:
    bad = int((weight[off.to(weight.device)] != 0).sum())
    if bad:
        raise FrozenHeadsError(
            f"{path} adapter {adapter!r}: {bad} LoRA entries of skipped heads are non-zero, so skipped heads change. "
            "Were the LoRA weights written directly, or trained without head masks? " + _REOPEN
        )
    return int(off.sum())


def _check_lora_layer(module: nn.Module, adapter: str, config: Any, path: str) -> tuple[int, int]:
    enabled, side = config.feature_mask(path)
    factors = module.lora_B if side == "out" else module.lora_A
    factor = factors[adapter]
    weight = _whole(factor.weight)
    expected = (enabled[:, None] if side == "out" else enabled[None, :]).expand_as(weight)
    if not isinstance(factor, HeadMaskedLinear) or not torch.equal(
        factor.weight_mask.expand_as(weight).cpu(), expected
    ):
        raise FrozenHeadsError(
            f"{path} adapter {adapter!r} is a CAST adapter skipping {int((~enabled).sum())} features here, but its "
            "head mask is missing or differs from its config, so training would move skipped heads. " + _REOPEN
        )
    return 1, _check_zero(weight, ~expected, path, adapter)


def _compare_base(
    module: nn.Module, path: str, slices: list[tuple[str, torch.Tensor]], reference: dict, geometry: Any
) -> int:
    ref = geometry.parse(path)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    compared = 0
    for kind in ("weight", "bias"):
        tensor, expected = getattr(base, kind, None), reference.get((ref.layer, ref.name, kind))
        if tensor is None or expected is None:
            continue
        tensor = _whole(tensor)
        if not tensor.is_floating_point() or tensor.shape != expected.shape:
            raise FrozenHeadsError(
                f"{path}.{kind} ({tensor.dtype}, {tuple(tensor.shape)}) cannot be compared with the reference "
                f"({expected.dtype}, {tuple(expected.shape)}); pass the base model the adapter was trained on "
                "(quantized bases cannot be compared bit for bit)."
            )
        tensor, expected = _out_in(base, tensor), _out_in(base, expected.to(tensor.device))
        for side, index in slices:
            if kind == "bias" and side == "in":
                continue  # the o-projection's bias is not per input head
            index = index.to(tensor.device)
            mine = tensor[index] if side == "out" else tensor[:, index]
            theirs = expected[index] if side == "out" else expected[:, index]
            if not torch.equal(mine, theirs):
                moved = int((mine != theirs).sum())
                raise FrozenHeadsError(
                    f"{path}.{kind}: {moved} entries of skipped heads differ from the reference (max "
                    f"{float((mine - theirs).abs().max()):.3g}); the base weights of skipped heads were changed."
                )
            compared += mine.numel()
    return compared
