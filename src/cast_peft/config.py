"""`CASTLoraConfig`: a `LoraConfig` whose adapter leaves a chosen set of attention heads untouched.

The adapter stays a LoRA adapter (``peft_type == "LORA"``): peft's own ``get_peft_model``, Trainer/TRL, saving and
merging work unchanged, and the saved folder is an ordinary LoRA adapter that vanilla peft and serving stacks load.
CAST's settings (the skip set and the model's head geometry) are written beside it to ``cast_config.json``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from ._core.errors import AdapterError
from ._io import atomic_write_text, pause_point, sha256_file
from .geometry import AttentionGeometry, HeadCounts, Role


CAST_CONFIG_NAME = "cast_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME (peft 0.21.2)
_WEIGHTS_HASH_KEY = "adapter_weights_sha256"
_CAST_FIELDS = ("skip_heads", "skip_kv_heads", "kv_head_policy", "attention_geometry", "source_map")
# Inits that write a non-zero B or rewrite the base weight, so frozen heads would change (see notes/peft-design §3.4).
_ALLOWED_INITS = (True, False, "gaussian")


def normalize_head_map(value: Any, name: str = "skip_heads") -> dict[int, list[int]]:
    """Turn ``{layer: [heads]}`` (JSON text, string keys, tuples, sets) into ``{int: sorted unique ints}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`{name}` is not valid JSON ({err.msg} at char {err.pos}); pass a mapping like "
                f'{{"3": [0, 5], "7": [2]}} (layer -> skipped head indices).'
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"`{name}` must map layer index -> list of head indices, e.g. {{3: [0, 5]}}; got {type(value).__name__}."
        )
    result: dict[int, list[int]] = {}
    for layer, heads in value.items():
        try:
            layer_index = int(layer)
            head_list = sorted({int(h) for h in ([heads] if isinstance(heads, (int, str)) else heads)})
        except (TypeError, ValueError):
            raise ValueError(
                f"`{name}` entry {layer!r}: {heads!r} is not `layer index -> list of head indices`; use e.g. {{3: [0, 5]}}."
            ) from None
        if layer_index < 0 or any(h < 0 for h in head_list):
            raise ValueError(
                f"`{name}` has a negative layer or head index ({layer!r}: {heads!r}); indices start at 0."
            )
        if head_list:
            result[layer_index] = head_list
    return dict(sorted(result.items()))


@dataclass
class CASTLoraConfig(LoraConfig):
    """LoRA on the attention projections in which the heads of ``skip_heads`` get no update at all.

    > Parameters that choose the heads

    Args:
        skip_heads (`dict[int, list[int]]`):
            ``{layer: [query head, ...]}``: heads whose q rows, o columns (and, per ``kv_head_policy``, k/v rows) the
            adapter never changes. Usually from ``ConflictMap.select(...)`` / ``CASTLoraConfig.from_conflict_map``.
        skip_kv_heads (`dict[int, list[int]]`, *optional*):
            ``{layer: [KV head, ...]}`` chosen directly (e.g. from a map scored with ``kv_scoring="separate"``).
            When given, it replaces ``kv_head_policy``.
        kv_head_policy (`str`, defaults to `"all"`):
            Under GQA/MQA a KV head is shared by a group of query heads. ``"all"``: freeze a KV head only when every
            query head of its group is skipped (the default: never take k/v away from a head that is tuned).
            ``"any"``: freeze it when any query head of its group is skipped (more conservative).

    > Parameters filled from the model

    Args:
        attention_geometry (`dict`, *optional*):
            Model type and head counts; filled by ``get_peft_model`` (or ``from_conflict_map``) and checked against
            every model the config is applied to, so a skip set is never applied to a model it was not made for.
        source_map (`dict`, *optional*):
            The conflict map's model identity and prompt format, filled by ``from_conflict_map``.

    All `LoraConfig` arguments apply. ``target_modules`` defaults to all attention projections (q, k, v, o or their
    fused equivalents). DoRA, ``lora_bias``, ``target_parameters`` and inits that change B or the base weight
    (PiSSA, OLoRA, LoftQ, CorDA, EVA, LoRA-GA, ...) are refused: each would change the skipped heads.
    """

    skip_heads: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "{layer: [query head indices]} that the adapter leaves unchanged."}
    )
    skip_kv_heads: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "{layer: [KV head indices]} to freeze directly; overrides kv_head_policy."}
    )
    kv_head_policy: str = field(
        default="all",
        metadata={"help": "'all': freeze a KV head only if all its query heads are skipped; 'any': if any is."},
    )
    attention_geometry: dict[str, Any] | None = field(
        default=None, metadata={"help": "Model type and head counts the skip set refers to (filled automatically)."}
    )
    source_map: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Where the skip set came from: the conflict map's model identity and prompt format (filled by "
            "from_conflict_map; used to warn when the adapter meets another checkpoint or data format)."
        },
    )

    def __post_init__(self) -> None:
        # Checked before LoraConfig's own validation so users get CAST's reason (peft may fail first on, e.g., LoftQ
        # needing scipy).
        self._refuse_settings_that_move_skipped_heads()
        super().__post_init__()
        self.skip_heads = normalize_head_map(self.skip_heads, "skip_heads")
        self.skip_kv_heads = (
            None if self.skip_kv_heads is None else normalize_head_map(self.skip_kv_heads, "skip_kv_heads")
        )
        if self.kv_head_policy not in ("all", "any"):
            raise ValueError(f"kv_head_policy={self.kv_head_policy!r}; use 'all' (default) or 'any'.")
        if self.attention_geometry is not None:
            self.attention_geometry = HeadCounts.from_dict(self.attention_geometry).to_dict()
            self._check_skip_sets(self.counts)
        # `_custom_modules` is not serialised, so every construction path registers the dispatcher again. Experimental
        # peft API, checked against peft 0.19-0.21 (`LoraConfig._register_custom_module`).
        from .layers import custom_module_mapping

        self._register_custom_module(custom_module_mapping())

    def _refuse_settings_that_move_skipped_heads(self) -> None:
        if self.use_dora:
            raise ValueError(
                "CAST cannot use DoRA: its magnitude vector rescales whole rows, including those of skipped heads. "
                "Set use_dora=False."
            )
        if self.lora_bias:
            raise ValueError("CAST cannot use lora_bias: the bias would shift skipped heads. Set lora_bias=False.")
        if self.init_lora_weights not in _ALLOWED_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} initialises B to non-zero values or rewrites the base "
                f"weights, which would change skipped heads. Use one of {_ALLOWED_INITS} (True is LoRA's default)."
            )
        if self.target_parameters:
            raise ValueError("CAST adapts attention projections, not `target_parameters`; remove target_parameters.")

    # --------------------------------------------------------------------------------------------- geometry
    @property
    def counts(self) -> HeadCounts:
        if self.attention_geometry is None:
            raise ValueError(
                "This CASTLoraConfig is not bound to a model yet; `get_peft_model(model, config)` binds it, or "
                "build it with `CASTLoraConfig.from_conflict_map(...)`."
            )
        return HeadCounts.from_dict(self.attention_geometry)

    @property
    def geometry(self) -> AttentionGeometry:
        return AttentionGeometry(self.counts)

    def bind(self, model: nn.Module) -> None:
        """Fill the head geometry from ``model`` and check that the skip set fits it (called by ``get_peft_model``)."""
        geometry = AttentionGeometry.from_model(model)
        counts = geometry.counts.to_dict()
        if self.attention_geometry is not None and self.attention_geometry != counts:
            raise ValueError(
                f"This CAST config (skip set / conflict map) was made for {self.attention_geometry}, but the model is "
                f"{counts}. Diagnose this model and build the config from its own conflict map."
            )
        self.attention_geometry = counts
        self._check_skip_sets(geometry.counts)
        if self.target_modules is None:
            self.target_modules = geometry.target_modules_regex()
        # GPT-2's attention projections are transformers Conv1D (weights stored (in, out)); peft's default dispatch
        # would flip this flag on the shared config with a warning, so set it here, where the model is known.
        if any(type(module).__name__ == "Conv1D" for module in _attention_modules(model, geometry)):
            self.fan_in_fan_out = True
        _refuse_plain_lora_targets(model, geometry)

    def _check_skip_sets(self, counts: HeadCounts) -> None:
        for name, units, head_map in (
            ("skip_heads", counts.num_heads, self.skip_heads),
            ("skip_kv_heads", counts.num_kv_heads, self.skip_kv_heads or {}),
        ):
            for layer, heads in head_map.items():
                if layer >= counts.num_layers or heads[-1] >= units:
                    raise ValueError(
                        f"`{name}` has layer {layer} heads {heads}, but the {counts.model_type} model has "
                        f"{counts.num_layers} layers x {units} {'KV ' if name == 'skip_kv_heads' else ''}heads "
                        f"(0-based). The skip set was made for another model: rebuild it from this model's map."
                    )
        total = sum(len(h) for h in self.skip_heads.values())
        if total >= counts.num_layers * counts.num_heads:
            raise ValueError(
                f"`skip_heads` skips all {total} heads, so the adapter could not change anything. Skip fewer heads "
                f"(e.g. ConflictMap.select(skip_ratio=0.1))."
            )

    def enabled_units(self, layer: int) -> dict[Role, torch.Tensor]:
        """Per role, which units of ``layer`` the adapter may change (bool tensors)."""
        counts = self.counts
        skipped = torch.zeros(counts.num_heads, dtype=torch.bool)
        skipped[self.skip_heads.get(layer, [])] = True
        if self.skip_kv_heads is not None:
            kv_skipped = torch.zeros(counts.num_kv_heads, dtype=torch.bool)
            kv_skipped[self.skip_kv_heads.get(layer, [])] = True
        else:
            groups = skipped.view(counts.num_kv_heads, counts.group_size)
            kv_skipped = groups.all(dim=1) if self.kv_head_policy == "all" else groups.any(dim=1)
        return {"q": ~skipped, "o": ~skipped, "k": ~kv_skipped, "v": ~kv_skipped}

    def feature_mask(self, module_path: str) -> tuple[torch.Tensor, str] | None:
        """``(enabled features, side)`` for an attention projection, ``None`` for any other module.

        ``side`` is ``"out"`` (mask rows of ``lora_B``) or ``"in"`` (mask columns of ``lora_A``, the o-projection).
        """
        geometry = self.geometry
        ref = geometry.parse(module_path)
        if ref is None:
            return None
        enabled = geometry.enabled_features(ref.name, self.enabled_units(ref.layer))
        return enabled, ("in" if ref.roles == ("o",) else "out")

    # --------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_conflict_map(
        cls,
        conflict_map: Any,
        *,
        skip_ratio: float | None = None,
        skip_k: int | None = None,
        threshold: float | None = None,
        policy: str = "score",
        seed: int = 0,
        kv_skip_ratio: float | None = None,
        **lora_kwargs: Any,
    ) -> CASTLoraConfig:
        """Config that skips the heads ``conflict_map.select(...)`` picks; other arguments go to `LoraConfig`.

        KV heads follow ``kv_head_policy`` unless ``kv_skip_ratio`` is given: then the map's KV-level scores
        (``kv_scoring="separate"``) pick that fraction of KV heads to freeze (``conflict_map.select_kv``).
        """
        skip = conflict_map.select(skip_ratio=skip_ratio, skip_k=skip_k, threshold=threshold, policy=policy, seed=seed)
        if kv_skip_ratio is not None:
            lora_kwargs["skip_kv_heads"] = conflict_map.select_kv(skip_ratio=kv_skip_ratio, policy=policy, seed=seed)
        source = {key: conflict_map.metadata.get(key) for key in ("model", "prompt_format")}
        return cls(skip_heads=skip, attention_geometry=conflict_map.counts.to_dict(), source_map=source, **lora_kwargs)

    # --------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write a plain-LoRA ``adapter_config.json`` and CAST's settings to ``cast_config.json`` (both atomically).

        peft's ``PeftModel.save_pretrained`` writes the weights first and this config last (peft 0.21.2), so the
        sha256 of ``adapter_model.safetensors`` is recorded here when the file exists: a folder whose weights and
        ``cast_config.json`` come from different saves (an interrupted re-save) is then refused on load.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise AdapterError(f"{save_directory} is a file; pass a directory to save the adapter config in.")
        save_directory.mkdir(parents=True, exist_ok=True)
        lora_dict = self.to_dict()
        cast_dict = {name: lora_dict.pop(name) for name in _CAST_FIELDS}
        lora_dict = {key: sorted(v) if isinstance(v, set) else v for key, v in lora_dict.items()}
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            lora_dict["auto_mapping"] = auto_mapping
        from . import __version__

        cast_dict["cast_peft_version"] = __version__
        weights = save_directory / ADAPTER_WEIGHTS_NAME
        if weights.is_file():
            cast_dict[_WEIGHTS_HASH_KEY] = sha256_file(weights)
        pause_point("adapter-config")
        atomic_write_text(save_directory / ADAPTER_CONFIG_NAME, json.dumps(lora_dict, indent=2, sort_keys=True))
        atomic_write_text(save_directory / CAST_CONFIG_NAME, json.dumps(cast_dict, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> CASTLoraConfig:
        """Load a CAST adapter's config. peft's own loader would return a plain `LoraConfig` for ``"LORA"``."""
        lora = LoraConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        cast_path = folder / CAST_CONFIG_NAME
        if not cast_path.is_file():
            try:
                from huggingface_hub import hf_hub_download

                cast_path = Path(hf_hub_download(pretrained_model_name_or_path, CAST_CONFIG_NAME, subfolder=subfolder))
            except Exception:
                raise ValueError(
                    f"{folder} has no {CAST_CONFIG_NAME}, so it is not a CAST adapter. Load it as plain LoRA with "
                    f"`LoraConfig.from_pretrained` / `PeftModel.from_pretrained`."
                ) from None
        try:
            cast_dict = json.loads(cast_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cast_path} is not valid JSON ({err.msg}); re-save the adapter.") from None
        cast_dict.pop("cast_peft_version", None)
        recorded = cast_dict.pop(_WEIGHTS_HASH_KEY, None)
        weights = folder / ADAPTER_WEIGHTS_NAME
        if recorded is not None and weights.is_file() and sha256_file(weights) != recorded:
            raise AdapterError(
                f"{weights} does not match {cast_path} (the sha256 recorded at save time differs): the weights and "
                "the skip set come from different saves, e.g. a re-save that was interrupted. Save the adapter "
                "again (peft_model.save_pretrained) or restore a complete copy of the folder."
            )
        unknown = set(cast_dict) - set(_CAST_FIELDS)
        if unknown:
            raise ValueError(f"{cast_path} has unknown keys {sorted(unknown)}; was it written by a newer cast-peft?")
        lora_dict = lora.to_dict()
        lora_dict.pop("peft_type", None)
        return cls(**lora_dict, **cast_dict)


def matching_lora_config(model: nn.Module, **lora_kwargs: Any) -> LoraConfig:
    """Plain peft LoRA on the attention projections a `CASTLoraConfig` targets by default: the baseline with the same
    budget (rank, targets) as a CAST adapter, for comparisons."""
    geometry = AttentionGeometry.from_model(model)
    conv1d = any(type(module).__name__ == "Conv1D" for module in _attention_modules(model, geometry))
    return LoraConfig(target_modules=geometry.target_modules_regex(), fan_in_fan_out=conv1d, **lora_kwargs)


def _attention_modules(model: nn.Module, geometry: AttentionGeometry) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[path] for paths in geometry.projections(model).values() for path in paths.values()]


def _refuse_plain_lora_targets(model: nn.Module, geometry: AttentionGeometry) -> None:
    from peft.tuners.lora import LoraLayer

    from .layers import CastLayerMixin

    for module in _attention_modules(model, geometry):
        if isinstance(module, LoraLayer) and not isinstance(module, CastLayerMixin):
            raise ValueError(
                "The attention projections are already wrapped by plain LoRA layers, which cannot hold head masks, so "
                "a CAST adapter added here would update skipped heads. Add the CAST adapter first (plain LoRA "
                "adapters can be added after it), or start from the unwrapped base model."
            )


# peft hands tuners the model only inside `LoraModel`; `_prepare_adapter_config` is the one step of `inject_adapter`
# that sees both the tuner (and so the model) and the adapter config before any module is replaced. Wrapping it binds
# a CASTLoraConfig to its model and leaves every other config untouched. Checked against peft 0.19-0.21.2.
_prepare_adapter_config = inspect.getattr_static(LoraModel, "_prepare_adapter_config")
if not getattr(_prepare_adapter_config, "_cast_peft_wrapped", False):
    _original = _prepare_adapter_config.__func__ if isinstance(_prepare_adapter_config, staticmethod) else None

    def _prepare_adapter_config_binding_cast(self, peft_config, model_config):
        if isinstance(peft_config, CASTLoraConfig):
            peft_config.bind(self.model)
        if _original is not None:
            return _original(peft_config, model_config)
        return _prepare_adapter_config(self, peft_config, model_config)

    _prepare_adapter_config_binding_cast._cast_peft_wrapped = True
    LoraModel._prepare_adapter_config = _prepare_adapter_config_binding_cast
