"""Which rows and columns of the attention projections belong to which head.

This module is the only place that knows how heads are laid out inside a model's attention projections. The
diagnosis (per-head gradients) and the tuner (per-head LoRA masks) both ask it, so they always agree.

Vocabulary:

* a *projection* is one weight-carrying module of an attention block (``q_proj``, GPT-2's fused ``c_attn``, ...);
* a *role* is what a set of features of a projection computes: ``"q"``, ``"k"``, ``"v"`` (output features) or
  ``"o"`` (input features of the output projection). A fused projection carries three roles;
* a *unit* is what a role is split into: query heads for ``q`` and ``o``, KV heads for ``k`` and ``v``.

Adding an architecture is one entry in :data:`LAYOUTS` plus a test model in ``tests/models.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._core.errors import ConfigError, UnsupportedArchitectureError


Role = Literal["q", "k", "v", "o"]
ROLES: tuple[Role, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class AttentionLayout:
    """Where an architecture keeps its attention projections.

    Args:
        block: regex for the attention block's module path; its one group is the layer index. It is matched against a
            suffix of the full module path, so wrappers (``base_model.model.``) do not matter.
        projections: projection module name (relative to the block) -> the roles it carries, in feature order.
        fused_qkv: how a projection carrying q, k and v orders them: ``"concat"`` is ``[Q(all heads) | K | V]``
            (GPT-2, Phi-3), ``"interleaved"`` is ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (GPT-NeoX).
    """

    block: str
    projections: Mapping[str, tuple[Role, ...]]
    fused_qkv: Literal["concat", "interleaved"] | None = None


_SEPARATE_QKVO = AttentionLayout(
    block=r"layers\.(\d+)\.self_attn",
    projections={"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",)},
)

#: Supported architectures, keyed by ``config.model_type``.
LAYOUTS: dict[str, AttentionLayout] = {
    "llama": _SEPARATE_QKVO,
    "mistral": _SEPARATE_QKVO,
    "qwen2": _SEPARATE_QKVO,
    "qwen3": _SEPARATE_QKVO,
    "gemma3_text": _SEPARATE_QKVO,
    # GPT-2: transformers' Conv1D stores weights as (in, out); the MLP also has a `c_proj`, hence the full block path.
    "gpt2": AttentionLayout(
        block=r"h\.(\d+)\.attn", projections={"c_attn": ("q", "k", "v"), "c_proj": ("o",)}, fused_qkv="concat"
    ),
    # GPT-NeoX views the fused output as (n_heads, 3 * head_dim): per head [q | k | v] (transformers 5.24).
    "gpt_neox": AttentionLayout(
        block=r"layers\.(\d+)\.attention",
        projections={"query_key_value": ("q", "k", "v"), "dense": ("o",)},
        fused_qkv="interleaved",
    ),
    "phi3": AttentionLayout(
        block=r"layers\.(\d+)\.self_attn",
        projections={"qkv_proj": ("q", "k", "v"), "o_proj": ("o",)},
        fused_qkv="concat",
    ),
}

_HOW_TO_ADD = (
    "To add an architecture, add one AttentionLayout entry to cast_peft.geometry.LAYOUTS (module path regex, "
    "projections and roles)."
)


@dataclass(frozen=True)
class HeadCounts:
    """The numbers that fix every head slice: layers, query heads, KV heads and the per-head width."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA, ``num_heads`` for MQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadCounts:
        """Counts from :meth:`to_dict` output (e.g. a hand-edited ``cast_config.json``), each value checked: a bad
        one is a ``ConfigError`` naming it, never a ``TypeError`` or ``ZeroDivisionError`` later."""
        fix = "rebuild it from the model (get_peft_model or diagnose write it)"
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"Attention geometry must be a mapping of head counts, got {type(data).__name__}; {fix}."
            )
        missing = [key for key in ("model_type", *_COUNT_FIELDS) if key not in data]
        if missing:
            raise ConfigError(f"Attention geometry {dict(data)} lacks {missing}; {fix}.")
        if not isinstance(data["model_type"], str):
            raise ConfigError(f"Attention geometry: model_type={data['model_type']!r} must be a string; {fix}.")
        for key in _COUNT_FIELDS:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Attention geometry: {key}={value!r} must be a positive integer; {fix}.")
        if data["num_heads"] % data["num_kv_heads"]:
            raise ConfigError(
                f"Attention geometry: num_heads={data['num_heads']} is not a multiple of "
                f"num_kv_heads={data['num_kv_heads']} (each KV head serves a whole group of query heads); {fix}."
            )
        return cls(data["model_type"], *(int(data[key]) for key in _COUNT_FIELDS))

    @classmethod
    def from_model_config(cls, config: Any) -> HeadCounts:
        """Read the counts from a transformers config (object or ``to_dict()`` output)."""
        if isinstance(config, Mapping):
            config = SimpleNamespace(**config)  # attribute access, as on the config object
        _refuse_multimodal(config)
        model_type = getattr(config, "model_type", None)
        layout_of(model_type)  # refuse unknown architectures before reading their fields
        num_heads = _first_attr(config, "num_attention_heads", "n_head")
        num_layers = _first_attr(config, "num_hidden_layers", "n_layer")
        hidden = _first_attr(config, "hidden_size", "n_embd")
        for name, value in (("num_attention_heads", num_heads), ("num_hidden_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"The model config's {name}={value!r} is not a positive integer.")
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        if isinstance(num_kv, int) and num_kv > 0 and num_heads % num_kv:
            raise UnsupportedArchitectureError(f"{num_heads} query heads cannot be grouped over {num_kv} KV heads.")
        counts = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv, "head_dim": head_dim}
        return cls.from_dict({"model_type": model_type, **counts})


_COUNT_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def _refuse_multimodal(config: Any) -> None:
    """Refuse a model with sub-models (a vision tower beside the language model, e.g. Llava, Gemma-3 4B+).

    Their towers' attention blocks have the same module names (``layers.N.self_attn.q_proj``), so the attention
    pattern would put the language model's head masks on the tower (or fail on its sizes). transformers' multimodal
    configs carry a ``text_config`` (``get_text_config()`` returns it, transformers 4.56-5.24).
    """
    get_text_config = getattr(config, "get_text_config", None)
    text = get_text_config() if callable(get_text_config) else getattr(config, "text_config", None)
    if text is None or text is config:
        return
    text_type = text.get("model_type") if isinstance(text, Mapping) else getattr(text, "model_type", None)
    raise UnsupportedArchitectureError(
        f"CAST does not tune multimodal models yet: this {getattr(config, 'model_type', None)!r} model has a "
        f"{text_type!r} language model beside other towers (e.g. vision), whose attention the pattern would also "
        f"match. Supported (text-only causal LMs): {', '.join(sorted(LAYOUTS))}. Load a text-only checkpoint of the "
        "language model with AutoModelForCausalLM."
    )


def _first_attr(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise UnsupportedArchitectureError(f"The model config has none of {names}.")


def layout_of(model_type: str | None) -> AttentionLayout:
    """The layout of ``model_type``, or a clear error listing the supported ones."""
    if model_type not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"CAST does not know the attention layout of model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(LAYOUTS))}. {_HOW_TO_ADD}"
        )
    return LAYOUTS[model_type]


@dataclass(frozen=True)
class ProjectionRef:
    """One attention projection found in a model path: its layer, its name in the block and its roles."""

    layer: int
    name: str
    roles: tuple[Role, ...]

    @property
    def input_side(self) -> bool:
        """Whether its heads are its input features (the output projection) rather than its outputs."""
        return name_is_input_side(self.roles)


@dataclass(frozen=True)
class AttentionGeometry:
    """Head slices of every attention projection of one architecture with one set of head counts."""

    counts: HeadCounts

    @property
    def layout(self) -> AttentionLayout:
        return layout_of(self.counts.model_type)

    @classmethod
    def from_model(cls, model: nn.Module) -> AttentionGeometry:
        """Geometry of a transformers model (or a peft wrapper of one), checked against the actual weight shapes."""
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no `.config`; CAST needs a transformers model. {_HOW_TO_ADD}"
            )
        geometry = cls(HeadCounts.from_model_config(config))
        geometry.check_model(model)
        return geometry

    # ----------------------------------------------------------------------------------------------- module paths
    def parse(self, path: str) -> ProjectionRef | None:
        """The attention projection that ``path`` names, or ``None`` when it is not one (e.g. an MLP module)."""
        names = "|".join(re.escape(name) for name in self.layout.projections)
        match = re.search(rf"(?:^|\.){self.layout.block}\.({names})$", path)
        if match is None:
            return None
        layer, name = int(match.group(1)), match.group(2)
        return ProjectionRef(layer, name, self.layout.projections[name])

    def target_modules_regex(self) -> str:
        """A peft ``target_modules`` regex (full match) selecting exactly the attention projections."""
        names = "|".join(re.escape(name) for name in self.layout.projections)
        return rf"(?:.*\.)?{self.layout.block.replace('(', '(?:', 1)}\.(?:{names})"

    def projections(self, model: nn.Module) -> dict[int, dict[str, str]]:
        """``{layer: {projection name: full module path}}`` for every attention projection of ``model``."""
        found: dict[int, dict[str, str]] = {}
        for path, _ in model.named_modules():
            ref = self.parse(path)
            if ref is None:
                continue
            other = found.setdefault(ref.layer, {}).get(ref.name)
            if other is not None and other != path:
                # Two towers (e.g. a vision encoder beside the language model) both match the attention pattern.
                raise UnsupportedArchitectureError(
                    f"Both {other} and {path} look like layer {ref.layer}'s {ref.name}: the model holds more than one "
                    f"stack of attention blocks (a multimodal model?). CAST tunes text-only causal LMs: "
                    f"{', '.join(sorted(LAYOUTS))}. {_HOW_TO_ADD}"
                )
            found[ref.layer][ref.name] = path
        return found

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose projections are not where, or not the size, this geometry says."""
        found = self.projections(model)
        counts = self.counts
        if sorted(found) != list(range(counts.num_layers)):
            raise UnsupportedArchitectureError(
                f"Expected attention projections in layers 0..{counts.num_layers - 1} of this {counts.model_type} "
                f"model, found layers {sorted(found)}. {_HOW_TO_ADD}"
            )
        modules = dict(model.named_modules())
        for layer, paths in found.items():
            missing = set(self.layout.projections) - set(paths)
            if missing:
                raise UnsupportedArchitectureError(f"Layer {layer} lacks projections {sorted(missing)}. {_HOW_TO_ADD}")
            for name, path in paths.items():
                out_features, in_features = _feature_counts(modules[path])
                side_size = in_features if self.is_input_side(name) else out_features
                expected = self.features(name)
                if side_size != expected:
                    raise UnsupportedArchitectureError(
                        f"{path} has {side_size} {'input' if self.is_input_side(name) else 'output'} "
                        f"features but {counts.num_heads} heads x {counts.head_dim} (KV heads: {counts.num_kv_heads}) "
                        f"give {expected}. The layout may carry extra per-head channels CAST does not know; refusing "
                        f"to guess. {_HOW_TO_ADD}"
                    )

    # ----------------------------------------------------------------------------------------------- head slices
    def units(self, role: Role) -> int:
        """How many units a role splits into: query heads for q/o, KV heads for k/v."""
        return self.counts.num_kv_heads if role in ("k", "v") else self.counts.num_heads

    def features(self, name: str) -> int:
        """Number of head-sliced features (outputs, or inputs for ``o``) of projection ``name``."""
        return sum(self.units(role) for role in self.layout.projections[name]) * self.counts.head_dim

    def role_index(self, name: str, role: Role) -> torch.Tensor:
        """Feature indices of ``role`` inside projection ``name``: a LongTensor ``[units(role), head_dim]``.

        Row ``u`` holds the output features (input features for ``o``) that belong to unit ``u``.
        """
        roles = self.layout.projections[name]
        if role not in roles:
            raise KeyError(f"Projection {name!r} does not carry role {role!r} (it carries {roles}).")
        d = self.counts.head_dim
        within_head = torch.arange(d)
        if len(roles) > 1 and self.layout.fused_qkv == "interleaved":
            # [q_h | k_h | v_h] per head; only defined for MHA (GPT-NeoX has no GQA).
            offset = roles.index(role) * d
            return torch.arange(self.units(role))[:, None] * (len(roles) * d) + offset + within_head
        offset = sum(self.units(other) for other in roles[: roles.index(role)]) * d
        return offset + torch.arange(self.units(role))[:, None] * d + within_head

    def is_input_side(self, name: str) -> bool:
        """Whether projection ``name`` has its heads on its input features (the output projection)."""
        return name_is_input_side(self.layout.projections[name])

    # ----------------------------------------------------------------------------------------------- KV groups
    def kv_groups(self) -> torch.Tensor:
        """LongTensor ``[num_kv_heads, group_size]``: row ``g`` holds the query heads that read KV head ``g``."""
        return _kv_groups(self.counts)

    def kv_heads_of_query_heads(self) -> torch.Tensor:
        """LongTensor ``[num_heads]``: entry ``h`` is the KV head that query head ``h`` reads."""
        groups = self.kv_groups()
        kv_of = torch.empty(self.counts.num_heads, dtype=torch.long)
        kv_of[groups] = torch.arange(len(groups))[:, None]
        return kv_of

    def kv_head_of(self, head: int) -> int:
        """The KV head that query head ``head`` reads."""
        return int(self.kv_heads_of_query_heads()[head])

    def enabled_features(self, name: str, enabled_units: Mapping[Role, torch.Tensor]) -> torch.Tensor:
        """Boolean mask over the head-sliced features of projection ``name`` from per-role unit masks.

        ``enabled_units[role]`` is a bool tensor ``[units(role)]``; the result is ``[features(name)]``.
        """
        mask = torch.zeros(self.features(name), dtype=torch.bool)
        for role in self.layout.projections[name]:
            index = self.role_index(name, role)
            mask[index.reshape(-1)] = enabled_units[role].repeat_interleave(self.counts.head_dim)
        return mask


KV_HEAD_POLICIES: tuple[str, ...] = ("all", "any")


def frozen_units(
    counts: HeadCounts,
    layer: int,
    skip_heads: Mapping[int, Sequence[int]],
    skip_kv_heads: Mapping[int, Sequence[int]] | None = None,
    kv_head_policy: str = "all",
) -> dict[Role, torch.Tensor]:
    """Per role, which units of ``layer`` are frozen (bool tensors ``[units(role)]``).

    Query heads (roles ``q`` and ``o``) are frozen exactly when ``skip_heads[layer]`` lists them. A KV head (roles ``k``
    and ``v``) is frozen when ``skip_kv_heads[layer]`` lists it if ``skip_kv_heads`` is given; otherwise by
    ``kv_head_policy``: ``"all"`` freezes it only when every query head of its group is skipped, ``"any"`` when at least
    one is. The LoRA tuner and the dense mode both read their frozen slices from here, so they agree.
    """
    if kv_head_policy not in KV_HEAD_POLICIES:
        raise ConfigError(f"kv_head_policy={kv_head_policy!r}; use 'all' (default) or 'any'.")
    skipped = torch.zeros(counts.num_heads, dtype=torch.bool)
    skipped[list(skip_heads.get(layer, []))] = True
    if skip_kv_heads is not None:
        kv_skipped = torch.zeros(counts.num_kv_heads, dtype=torch.bool)
        kv_skipped[list(skip_kv_heads.get(layer, []))] = True
    else:
        groups = skipped[_kv_groups(counts)]
        kv_skipped = groups.all(dim=1) if kv_head_policy == "all" else groups.any(dim=1)
    return {"q": skipped, "o": skipped.clone(), "k": kv_skipped, "v": kv_skipped.clone()}


def _kv_groups(counts: HeadCounts) -> torch.Tensor:
    # The one statement of GQA grouping: query heads share KV heads in contiguous groups (transformers' repeat_kv
    # repeats each KV head group_size times, so query head h reads KV head h // group_size).
    return torch.arange(counts.num_heads).view(counts.num_kv_heads, counts.group_size)


def name_is_input_side(roles: tuple[Role, ...]) -> bool:
    """Whether a projection's heads are its input features (the output projection) rather than its outputs."""
    return roles == ("o",)


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module  # peft wrappers


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` (or the base layer a peft wrapper holds) is a transformers ``Conv1D`` (GPT-2's attention),
    which stores its weight as ``(in, out)``: the one test for it."""
    return isinstance(_base_layer(module), Conv1D)


def _feature_counts(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, a transformers Conv1D or a bitsandbytes layer."""
    base = _base_layer(module)
    if hasattr(base, "out_features") and hasattr(base, "in_features"):
        return base.out_features, base.in_features
    if is_conv1d(base):  # weight stored (in, out)
        return base.nf, base.weight.shape[0]
    raise UnsupportedArchitectureError(f"Cannot read the feature sizes of a {type(base).__name__}. {_HOW_TO_ADD}")
