"""Head-masked LoRA layers.

A CAST layer is peft's own LoRA layer with one change: the LoRA factor that touches head features is swapped for a
:class:`HeadMaskedLinear` that shares its weight and multiplies it by a fixed mask. For q/k/v (and fused qkv)
projections the mask zeroes ``lora_B`` rows of skipped heads' output features; for the output projection it zeroes
``lora_A`` columns of skipped heads' input features. So every forward path peft has (plain, mixed-batch, bitsandbytes)
is masked without copying peft's forward code, and the masked slices:

* are zeroed when the mask is installed and after every state-dict load,
* get an exactly-zero gradient (the mask is applied in forward), so SGD/Adam/AdamW with weight decay keep them 0,
* give an exactly-zero delta, so merging adds ``+0`` to skipped heads and leaves them bit-identical.

The bitsandbytes variants are in :mod:`.bnb`; which layer a module gets is decided in :mod:`.dispatch`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn


class HeadMaskedLinear(nn.Linear):
    """An ``nn.Linear`` (a LoRA factor) whose weight is multiplied by a fixed boolean mask in every forward.

    It shares the ``Parameter`` of the factor it replaces, so optimizers, peft's ``requires_grad`` handling and the
    state dict (``lora_B.<adapter>.weight``) see the same tensor as with plain LoRA. The mask is a non-persistent
    buffer (checkpoints stay plain LoRA), rebuilt from a CPU copy after every load.
    """

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        # Built without nn.Linear.__init__ so no weights are allocated or initialised (no RNG is consumed).
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # peft's low_cpu_mem_usage=True builds adapter weights on `meta` and assigns them at load: a mask made there
        # would hold no values, so it stays on the CPU until zero_masked_ (run after every load) moves it along.
        device = linear.weight.device if linear.weight.device.type != "meta" else torch.device("cpu")
        self.register_buffer("weight_mask", mask.to(device=device, dtype=torch.bool), persistent=False)
        # The mask's values, out of reach of Module.to/to_empty: meta-device initialisation (accelerate's FSDP2
        # cpu_ram_efficient_loading moves the whole model to `meta`, loads, and only then restores buffers; torch's
        # recipe calls to_empty before loading) leaves the buffer without its values at load time; zero_masked_
        # rebuilds it from here.
        self._mask_values = mask.detach().to(device="cpu", dtype=torch.bool).clone()
        self.zero_masked_()
        self.register_load_state_dict_post_hook(_zero_masked_after_load)

    @torch.no_grad()
    def zero_masked_(self) -> None:
        """Set the masked slice of the weight to exactly zero (and keep the mask on the weight's device)."""
        if self.weight.device.type == "meta":
            return
        # Rebuilt on every load: after `to_empty` (torch's meta-device recipe for FSDP2) the buffer holds arbitrary
        # values on the right device.
        self.weight_mask = self._mask_values.to(self.weight.device, copy=True)  # never an alias of the source
        mask = self.weight_mask
        mesh = getattr(self.weight, "device_mesh", None)
        if mesh is not None:
            # FSDP2 (fully_shard) keeps the weight as a sharded DTensor outside forward, e.g. when a sharded
            # checkpoint is loaded; a plain mask cannot multiply it, the same mask replicated on its mesh can
            # (each rank then masks its own rows, no communication). Checked with torch 2.13.
            from torch.distributed.tensor import DTensor, Replicate

            mask = DTensor.from_local(mask, mesh, [Replicate()] * mesh.ndim, run_check=False)
        self.weight.mul_(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={int((~self.weight_mask).sum())}/{self.weight_mask.numel()}"


def _zero_masked_after_load(module: HeadMaskedLinear, incompatible_keys: Any) -> None:
    # A checkpoint trained without masks may carry non-zero values in skipped heads' slices; keep them physically 0
    # so raw-weight consumers (merging, add_weighted_adapter, exports) agree with the masked forward.
    module.zero_masked_()


class CastLayerMixin:
    """Installs per-adapter head masks on a peft LoRA layer; put it before the peft class in the bases."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if kwargs.get("target_name") is not None:
            self.install_head_mask(adapter_name, config, kwargs["target_name"])

    def install_head_mask(self, adapter_name: str, config: Any, target_name: str) -> None:
        """Swap the head-facing LoRA factor of ``adapter_name`` for a masked one (no-op for plain LoRA configs)."""
        # Duck-typed so that layers need not import the config (the config registers these layers with peft).
        if not callable(getattr(config, "feature_mask", None)):
            return  # a plain LoRA adapter on the same module: no mask
        spec = config.feature_mask(target_name)
        if spec is None:
            return
        enabled, side = spec
        factors = self.lora_B if side == "out" else self.lora_A
        factor = factors[adapter_name]
        if isinstance(factor, HeadMaskedLinear) or bool(enabled.all()):
            return  # nothing skipped in this projection: plain LoRA, no overhead
        mask = enabled[:, None] if side == "out" else enabled[None, :]
        factors[adapter_name] = HeadMaskedLinear(factor, mask)

    def head_mask(self, adapter_name: str) -> torch.Tensor | None:
        """Mask (broadcastable to the LoRA delta ``[out, in]``) of ``adapter_name``, ``None`` when nothing is masked."""
        for factors in (self.lora_B, self.lora_A):
            factor = factors[adapter_name] if adapter_name in factors else None  # noqa: SIM401 (ModuleDict has no .get)
            if isinstance(factor, HeadMaskedLinear):
                return factor.weight_mask
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # Exactly equal to the parent's delta while masked slices are zero; multiplying again guards against slices
        # written behind the layer's back (e.g. weights assigned directly).
        delta = super().get_delta_weight(adapter)
        mask = self.head_mask(adapter)
        if mask is None:
            return delta
        mask = mask.to(delta.device)
        return delta * (mask.T if self.fan_in_fan_out else mask)


class CastLinear(CastLayerMixin, LoraLinear):
    """Head-masked LoRA for ``nn.Linear`` and transformers ``Conv1D`` (GPT-2) bases."""


def cast_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """All CAST layers of a (peft) model by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, CastLayerMixin)}
