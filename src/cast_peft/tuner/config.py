"""`CASTLoraConfig`: a `LoraConfig` whose adapter leaves a chosen set of attention heads untouched.

The adapter stays a LoRA adapter (``peft_type == "LORA"``): peft's own ``get_peft_model``, Trainer/TRL, saving and
merging work unchanged, and the saved folder is an ordinary LoRA adapter that vanilla peft and serving stacks load.
CAST's settings (the skip set and the model's head geometry) are written beside it to ``cast_config.json``.
"""

from __future__ import annotations

import json
import numbers
import operator
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from .._core.errors import AdapterError, CastWarning, ConfigError
from .._core.io import atomic_write_text, pause_point, sha256_file
from .._core.peft_compat import bind_cast_configs_on_injection, load_cast_configs_from_cast_folders
from ..geometry import AttentionGeometry, HeadCounts, Role, frozen_units, is_conv1d


CAST_CONFIG_NAME = "cast_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME (peft 0.21.2)
_WEIGHTS_HASH_KEY = "adapter_weights_sha256"
_CAST_FIELDS = ("skip_heads", "skip_kv_heads", "kv_head_policy", "attention_geometry", "source_map")
# The inits that keep B = 0 and the base weight as it is; every other one (PiSSA, OLoRA, LoftQ, ...) writes a
# non-zero B or rewrites the base weight, so frozen heads would change.
_ALLOWED_INITS = (True, False, "gaussian")


def _index(value: Any) -> int:
    """An index from an integer (numpy and 0-d tensor ones too) or a string of digits (JSON keys); bools, floats
    such as 1.7 (which ``int()`` would silently truncate) and other text raise ``TypeError``."""
    if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
        return int(value)
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(value)
    return operator.index(value)  # ints, numpy ints, 0-d integer tensors; floats raise TypeError


def normalize_head_map(value: Any, name: str = "skip_heads") -> dict[int, list[int]]:
    """Turn ``{layer: [heads]}`` (JSON text, string keys, tuples, sets) into ``{int: sorted unique ints}``.

    Layers and heads must be integers >= 0 (or strings of digits, as JSON keys are); anything else, bools and floats
    included, is a ``ConfigError``.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"`{name}` is not valid JSON ({err.msg} at char {err.pos}); pass a mapping like "
                f'{{"3": [0, 5], "7": [2]}} (layer -> skipped head indices).'
            ) from None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"`{name}` must map layer index -> list of head indices, e.g. {{3: [0, 5]}}; got {type(value).__name__}."
        )
    result: dict[int, list[int]] = {}
    for layer, heads in value.items():
        try:
            layer_index = _index(layer)
            single = isinstance(heads, (numbers.Number, str)) or not isinstance(heads, Iterable)
            head_list = sorted({_index(h) for h in ([heads] if single else heads)})
        except TypeError:
            raise ConfigError(
                f"`{name}` entry {layer!r}: {heads!r} is not `layer index -> list of head indices` (integers, not "
                "floats or bools); use e.g. {3: [0, 5]}."
            ) from None
        if layer_index < 0 or any(h < 0 for h in head_list):
            raise ConfigError(
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
            The conflict map's model identity and prompt format, filled by ``from_conflict_map``. For a skip set
            given by hand, ``get_peft_model`` records the identity of the model it is first bound to. Binding to a
            model with another identity (same geometry, another checkpoint) warns.

    > What stays frozen (exactly)

    For each skipped query head h of a layer: its rows of W_q (and of the q bias), its input columns of W_o, and the
    rows of W_k/W_v (and biases) of the KV head it reads *only when that KV head is frozen* (``kv_head_policy`` /
    ``skip_kv_heads``). Under GQA/MQA a skipped head whose KV head is not frozen reads k/v that train, and every
    head's input changes once an earlier layer is tuned: a skipped head's *weights* are bit-identical to the base,
    its *output* is not. ``cast_peft.describe_frozen(config_or_model)`` prints what is frozen for a skip set.

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
            raise ConfigError(f"kv_head_policy={self.kv_head_policy!r}; use 'all' (default) or 'any'.")
        if self.attention_geometry is not None:
            self.attention_geometry = HeadCounts.from_dict(self.attention_geometry).to_dict()
            self._check_skip_sets(self.counts)
        # `_custom_modules` is not serialised, so every construction path registers the dispatcher again. Experimental
        # peft API, checked against peft 0.19-0.21 (`LoraConfig._register_custom_module`).
        from .dispatch import custom_module_mapping

        self._register_custom_module(custom_module_mapping())

    def _refuse_settings_that_move_skipped_heads(self) -> None:
        if self.use_dora:
            raise ConfigError(
                "CAST cannot use DoRA: its magnitude vector rescales whole rows, including those of skipped heads. "
                "Set use_dora=False."
            )
        if self.lora_bias:
            raise ConfigError("CAST cannot use lora_bias: the bias would shift skipped heads. Set lora_bias=False.")
        if self.bias != "none":
            raise ConfigError(
                f"CAST cannot use bias={self.bias!r}: peft then trains the whole bias of every targeted projection, "
                "including the q/k/v bias entries of skipped heads. Set bias='none' (the LoRA default)."
            )
        if self.init_lora_weights not in _ALLOWED_INITS:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} initialises B to non-zero values or rewrites the base "
                f"weights, which would change skipped heads. Use one of {_ALLOWED_INITS} (True is LoRA's default)."
            )
        if self.target_parameters:
            raise ConfigError("CAST adapts attention projections, not `target_parameters`; remove target_parameters.")

    # --------------------------------------------------------------------------------------------- geometry
    @property
    def counts(self) -> HeadCounts:
        if self.attention_geometry is None:
            raise ConfigError(
                "This CASTLoraConfig is not bound to a model yet; `get_peft_model(model, config)` binds it, or "
                "build it with `CASTLoraConfig.from_conflict_map(...)`."
            )
        return HeadCounts.from_dict(self.attention_geometry)

    @property
    def geometry(self) -> AttentionGeometry:
        return AttentionGeometry(self.counts)

    def bind(self, model: nn.Module) -> None:
        """Fill the head geometry from ``model`` and check that the skip set fits it (called by ``get_peft_model``).

        Refuses settings that would train a skipped head's weights (``modules_to_save`` over an attention projection)
        or make the skip set meaningless (no attention projection targeted). Warns (``CastWarning``) when ``model``
        is another checkpoint than the one the skip set was made for, and when no KV head is frozen on a GQA/MQA
        model (then every skipped head reads k/v that train; see :func:`cast_peft.describe_frozen`).
        """
        geometry = AttentionGeometry.from_model(model)
        counts = geometry.counts.to_dict()
        if self.attention_geometry is not None and self.attention_geometry != counts:
            raise ConfigError(
                f"This CAST config (skip set / conflict map) was made for {self.attention_geometry}, but the model is "
                f"{counts}. Diagnose this model and build the config from its own conflict map."
            )
        self.attention_geometry = counts
        self._check_skip_sets(geometry.counts)
        if self.target_modules is None:
            self.target_modules = geometry.target_modules_regex()
        # GPT-2's attention projections are transformers Conv1D (weights stored (in, out)); peft's default dispatch
        # would flip this flag on the shared config with a warning, so set it here, where the model is known.
        if any(is_conv1d(module) for module in _attention_modules(model, geometry)):
            self.fan_in_fan_out = True
        _refuse_plain_lora_targets(model, geometry)
        paths = [path for layer_paths in geometry.projections(model).values() for path in layer_paths.values()]
        self._refuse_modules_to_save_over_attention(model, paths)
        self._refuse_skip_set_without_attention_targets(paths)
        self._check_model_identity(model)
        self._warn_when_no_kv_head_is_frozen()

    def _has_skips(self) -> bool:
        return any(self.skip_heads.values()) or any((self.skip_kv_heads or {}).values())

    def _refuse_modules_to_save_over_attention(self, model: nn.Module, paths: list[str]) -> None:
        # peft wraps every module whose path ends with an entry (peft 0.21.2 `_set_trainable`: `key.endswith(name)`)
        # and trains a full copy of it: the rows and columns of skipped heads included.
        names = self.modules_to_save or []
        for key, _ in model.named_modules():
            hit = next((name for name in names if key and key.endswith(name)), None)
            if hit is not None and any(path == key or path.startswith(f"{key}.") for path in paths):
                raise ConfigError(
                    f"modules_to_save entry {hit!r} matches {key!r}, which is or holds an attention projection; peft "
                    "would train a full copy of it, skipped heads included. Remove it from modules_to_save (CAST "
                    "already puts head-masked LoRA on the attention projections)."
                )

    def _refuse_skip_set_without_attention_targets(self, paths: list[str]) -> None:
        from peft.tuners.tuners_utils import check_target_module_exists  # public helper, peft 0.19-0.21.2

        if not self._has_skips() or any(check_target_module_exists(self, path) for path in paths):
            return
        raise ConfigError(
            f"target_modules={self.target_modules!r} matches no attention projection of this model, so the skip set "
            "would have no effect. Leave target_modules unset (CAST then targets every attention projection) or "
            f"include them, e.g. {sorted(self.geometry.layout.projections)}."
        )

    def _check_model_identity(self, model: nn.Module) -> None:
        """Warn when ``model`` is not the checkpoint the skip set was made for; record it when nothing says which."""
        from ..models import model_identity

        if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
            return
        identity = model_identity(model)
        made_for = (self.source_map or {}).get("model") or {}
        if not made_for.get("config_sha256"):
            # A skip set given by hand: remember the model it was first bound to, so an adapter saved from it warns
            # when opened on another checkpoint.
            self.source_map = {**(self.source_map or {}), "model": identity}
        elif made_for["config_sha256"] != identity["config_sha256"]:
            warnings.warn(
                f"This CAST skip set was made for {made_for.get('name_or_path') or 'another model'} (config "
                f"{made_for['config_sha256']}), but is applied to {identity['name_or_path'] or 'a model'} (config "
                f"{identity['config_sha256']}): same head geometry, another checkpoint. Its conflicting heads need "
                "not be this model's; diagnose this model (cast_peft.diagnose) and build the config from its map.",
                CastWarning,
                stacklevel=4,
            )

    def _warn_when_no_kv_head_is_frozen(self) -> None:
        counts = self.counts
        if self.inference_mode or self.skip_kv_heads is not None or counts.group_size == 1 or not self._has_skips():
            return
        if any(not bool(self.enabled_units(layer)["k"].all()) for layer in self.skip_heads):
            return
        kind = "MQA" if counts.num_kv_heads == 1 else "GQA"
        skipped = sum(len(heads) for heads in self.skip_heads.values())
        warnings.warn(
            f"The skip set freezes no KV head: on this {kind} model {counts.group_size} query heads share each KV "
            f"head, so all {skipped} skipped heads read k/v rows that train and their outputs will change; only "
            "their own q rows and o columns stay bit-identical. To freeze k/v too, skip whole KV groups, set "
            "kv_head_policy='any' or pass skip_kv_heads. cast_peft.describe_frozen(config) lists what is frozen.",
            CastWarning,
            stacklevel=4,
        )

    def _check_skip_sets(self, counts: HeadCounts) -> None:
        for name, units, head_map in (
            ("skip_heads", counts.num_heads, self.skip_heads),
            ("skip_kv_heads", counts.num_kv_heads, self.skip_kv_heads or {}),
        ):
            for layer, heads in head_map.items():
                if layer >= counts.num_layers or heads[-1] >= units:
                    raise ConfigError(
                        f"`{name}` has layer {layer} heads {heads}, but the {counts.model_type} model has "
                        f"{counts.num_layers} layers x {units} {'KV ' if name == 'skip_kv_heads' else ''}heads "
                        f"(0-based). The skip set was made for another model: rebuild it from this model's map."
                    )
        total = sum(len(h) for h in self.skip_heads.values())
        if total >= counts.num_layers * counts.num_heads:
            raise ConfigError(
                f"`skip_heads` skips all {total} heads, so the adapter could not change anything. Skip fewer heads "
                f"(e.g. ConflictMap.select(skip_ratio=0.1))."
            )

    def enabled_units(self, layer: int) -> dict[Role, torch.Tensor]:
        """Per role, which units of ``layer`` the adapter may change (bool tensors); see `geometry.frozen_units`."""
        frozen = frozen_units(self.counts, layer, self.skip_heads, self.skip_kv_heads, self.kv_head_policy)
        return {role: ~units for role, units in frozen.items()}

    def feature_mask(self, module_path: str) -> tuple[torch.Tensor, str] | None:
        """``(enabled features, side)`` for an attention projection, ``None`` for any other module.

        ``side`` is ``"out"`` (mask rows of ``lora_B``) or ``"in"`` (mask columns of ``lora_A``, the o-projection).
        """
        geometry = self.geometry
        ref = geometry.parse(module_path)
        if ref is None:
            return None
        enabled = geometry.enabled_features(ref.name, self.enabled_units(ref.layer))
        return enabled, ("in" if ref.input_side else "out")

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
        from .._core import __version__

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
                raise AdapterError(
                    f"{folder} has no {CAST_CONFIG_NAME}, so it is not a CAST adapter. Load it as plain LoRA with "
                    f"`LoraConfig.from_pretrained` / `PeftModel.from_pretrained`."
                ) from None
        try:
            cast_dict = json.loads(cast_path.read_text())
        except json.JSONDecodeError as err:
            raise AdapterError(f"{cast_path} is not valid JSON ({err.msg}); re-save the adapter.") from None
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
            raise AdapterError(f"{cast_path} has unknown keys {sorted(unknown)}; was it written by a newer cast-peft?")
        lora_dict = lora.to_dict()
        lora_dict.pop("peft_type", None)
        return cls(**lora_dict, **cast_dict)


def matching_lora_config(model: nn.Module, **lora_kwargs: Any) -> LoraConfig:
    """Plain peft LoRA on the attention projections a `CASTLoraConfig` targets by default: the baseline with the same
    budget (rank, targets) as a CAST adapter, for comparisons."""
    geometry = AttentionGeometry.from_model(model)
    conv1d = any(is_conv1d(module) for module in _attention_modules(model, geometry))
    return LoraConfig(target_modules=geometry.target_modules_regex(), fan_in_fan_out=conv1d, **lora_kwargs)


def _attention_modules(model: nn.Module, geometry: AttentionGeometry) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[path] for paths in geometry.projections(model).values() for path in paths.values()]


def _refuse_plain_lora_targets(model: nn.Module, geometry: AttentionGeometry) -> None:
    from peft.tuners.lora import LoraLayer

    from .layers import CastLayerMixin

    for module in _attention_modules(model, geometry):
        if isinstance(module, LoraLayer) and not isinstance(module, CastLayerMixin):
            raise ConfigError(
                "The attention projections are already wrapped by plain LoRA layers, which cannot hold head masks, so "
                "a CAST adapter added here would update skipped heads. Add the CAST adapter first (plain LoRA "
                "adapters can be added after it), or start from the unwrapped base model."
            )


# peft hooks (binding at injection, CAST configs from CAST folders), version-checked in one place.
bind_cast_configs_on_injection(CASTLoraConfig)
load_cast_configs_from_cast_folders(CASTLoraConfig, CAST_CONFIG_NAME)
