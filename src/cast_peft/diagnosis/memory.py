"""The memory planner of the diagnosis: the peak a run will reach, per device, before it starts.

:func:`plan_diagnosis_memory` predicts it from the model's shapes alone (a ``transformers`` config is enough, so it
tabulates 8B/70B shapes on a laptop), or from a loaded model (then the weights are the bytes actually resident on each
device, and layers, accumulators and logits are placed where the model computes them). ``diagnose(...,
accumulation="auto", max_tokens_per_pass="auto")`` picks with it the most exact, then the fastest, setting that fits
and logs the predicted peak before the first pass.

What a diagnosis pass holds (Llama-family decoder, ``e`` = bytes of the compute dtype, ``N`` = tokens of one
forward/backward pass, i.e. rows per micro-batch x padded length):

* **weights**: as loaded (NF4: 0.5 byte per decoder-linear parameter plus one fp32 absmax per 64; embeddings, head and
  norms in the compute dtype);
* **accumulators**: per objective, fp32: exact = the attention projections' weights (+ biases); sketch = ``units x
  head_dim x sketch_dim`` per role and layer (+ biases); ``offload=True`` keeps them in CPU memory, plus, for a model
  on a GPU, each objective's pinned staging buffers (``hooks.HostAdder``: at most ``OFFLOAD_COPIES_IN_FLIGHT`` per
  result shape);
* **sketch**: the seeded ``[hidden, sketch_dim]`` fp32 matrix, one per device;
* **activations**: what autograd and the hooks keep from the forward to the backward pass. The base weights need no
  gradient, so a linear layer saves nothing (bitsandbytes' 4-bit matmul neither); per token and layer: both RMSNorms'
  fp32 input (``2 x 4 h``), the q/k/v input and the o input the hooks keep (``e h + e n d``), SDPA's q/k/v/output
  (``4 e n d``: with a padding mask k/v are repeated per query head) and log-sum-exp, the MLP's gate, SiLU and up outputs (``3 e I``); plus the final norm;
* **backward**: the largest transient of one layer's backward pass (the MLP's input gradients, the hooks' fp32 copies
  of ``x`` and ``g`` and, in sketch mode, ``x S``; a dequantized 4-bit weight). With ``hook_precision="bf16"``
  (the CUDA default) the hooks' copies are bf16 or none: the fp32 count is kept as an upper bound;
* **logits**: the logits (``e V N``), their gradient (``e V N``) and the fp32 temporaries of one chunk of the chunked
  cross-entropy (``diagnosis.ablation.row_losses`` never makes a full fp32 copy);
* **ablation** (``sensitivity="ablation"``): the no-grad forward of ``ablation_chunk`` replicas of a micro-batch, its
  logits and the largest layer transient.

``peak = weights + accumulators + sketch + max(activations + backward + logits, ablation)``. Allocator slack (the CUDA
caching allocator's rounding and fragmentation) is not modelled. Checked on CPU (``benchmarks/results/scaling.md``,
random Llamas of 135M-1.3B parameters, fp32 and NF4, RSS): the planned addition is within +3% to +7% of the measured
one. ``tests/test_memory.py`` checks the activations term against the tensors autograd and the hooks keep (+2.5%);
``tests/test_gpu.py`` checks the plan against ``torch.cuda.max_memory_allocated`` where a GPU is available.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..geometry import AttentionGeometry
from .hooks import OFFLOAD_COPIES_IN_FLIGHT, execution_device, hooked_projections


#: Positions per chunk of the chunked cross-entropy: at most ~32 MiB of fp32 logits per chunk (vocab 128k: 256).
CE_CHUNK_ELEMENTS = 1 << 23
#: Share of a device's free memory the automatic choice may plan to use (the rest absorbs allocator slack).
FREE_MEMORY_SHARE = 0.85
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "codegen", "gpt_bigcode"}
_NF4_BYTES = 0.5 + 4 / 64  # packed 4-bit values + one fp32 absmax per 64 (bitsandbytes' default block)


def ce_chunk_positions(vocab: int) -> int:
    """Positions per chunk of the chunked cross-entropy for a vocabulary of ``vocab``."""
    return max(1, CE_CHUNK_ELEMENTS // vocab)


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted bytes of a diagnosis on one device (fields as in the module docstring)."""

    weights: int = 0
    accumulators: int = 0
    sketch: int = 0
    activations: int = 0
    backward: int = 0
    logits: int = 0
    ablation: int = 0

    @property
    def peak(self) -> int:
        """The predicted peak of the device, weights included."""
        passes = max(self.activations + self.backward + self.logits, self.ablation)
        return self.weights + self.accumulators + self.sketch + passes

    @property
    def added(self) -> int:
        """The peak minus the weights: what the diagnosis allocates on top of the loaded model."""
        return self.peak - self.weights

    def to_dict(self) -> dict[str, int]:
        names = ("weights", "accumulators", "sketch", "activations", "backward", "logits", "ablation")
        return {name: getattr(self, name) for name in names} | {"peak": self.peak}


@dataclass(frozen=True)
class DiagnosisMemoryPlan:
    """What :func:`plan_diagnosis_memory` predicts: per device (``"cuda:0"``, ``"cpu"``, ...) a :class:`DeviceMemory`."""

    accumulation: str
    rows_per_pass: int
    tokens_per_pass: int
    devices: dict[str, DeviceMemory] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The largest predicted per-device peak."""
        return max(d.peak for d in self.devices.values())

    def summary(self) -> str:
        """One line per device, in GiB, for logs and tables."""
        parts = [
            f"accumulation={self.accumulation}, {self.rows_per_pass} rows ({self.tokens_per_pass} tokens) per pass"
        ]
        for name, d in self.devices.items():
            parts.append(
                f"{name}: peak {d.peak / 2**30:.2f} GiB (weights {d.weights / 2**30:.2f}, accumulators "
                f"{d.accumulators / 2**30:.2f}, activations {d.activations / 2**30:.2f}, backward "
                f"{d.backward / 2**30:.2f}, logits {d.logits / 2**30:.2f}, ablation {d.ablation / 2**30:.2f})"
            )
        return "; ".join(parts)


@dataclass(frozen=True)
class _Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool
    qkv_bias: bool

    @classmethod
    def of(cls, config: Any) -> _Shapes:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config

        def get(*names: str, default: Any = None) -> Any:
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            return default

        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        model_type = getattr(config, "model_type", "")
        return cls(
            hidden=hidden,
            intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            layers=get("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            vocab=config.vocab_size,
            tied=bool(get("tie_word_embeddings", default=False)),
            gated=model_type not in _UNGATED,
            qkv_bias=bool(get("attention_bias", default=model_type in ("qwen2", "gpt2"))),
        )

    def attention_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        weights = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden
        return weights + ((q_out + 2 * kv_out) if self.qkv_bias else 0)

    def mlp_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.intermediate

    def sketch_params(self, sketch_dim: int) -> int:
        units = 2 * self.heads + 2 * self.kv_heads  # q and o per query head, k and v per KV head
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return units * self.head_dim * sketch_dim + bias


def _dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def plan_diagnosis_memory(
    model_or_config: nn.Module | Any,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    accumulation: str = "sketch",
    sketch_dim: int = 512,
    offload: bool = False,
    max_tokens_per_pass: int | None = None,
    sensitivity: str = "taylor",
    ablation_chunk: int = 8,
    dtype: torch.dtype | str | None = None,
    load_in_4bit: bool | None = None,
    device: str = "cuda:0",
) -> DiagnosisMemoryPlan:
    """Predict, per device, the peak memory of ``diagnose()`` (see the module docstring for what is counted).

    Args:
        model_or_config: a loaded causal LM (weights counted as resident, per device; layers, accumulators and logits
            on the devices they compute on) or a ``transformers`` config (one device, ``device``).
        batch_size, max_length: the calibration batches (rows x padded length; a bound: padding is to the batch's
            longest row).
        accumulation: ``"exact"`` or ``"sketch"`` (what ``"auto"`` chooses between).
        sketch_dim, offload, sensitivity, ablation_chunk: as in :func:`cast_peft.diagnose`.
        max_tokens_per_pass: token budget of one forward/backward pass: each batch is split into micro-batches of
            ``max(1, max_tokens_per_pass // max_length)`` rows; ``None``: whole batches.
        dtype: compute dtype (default: the model's, or bf16 for a config; fp32 on CPU for 4-bit).
        load_in_4bit: NF4 decoder linears (default: whether the model is a bitsandbytes 4-bit one; ``False`` for a
            config).
        device: the device name used for a config.
    """
    if accumulation not in ("exact", "sketch"):
        raise ValueError(f"accumulation={accumulation!r}: plan 'exact' or 'sketch' ('auto' chooses between them).")
    is_model = isinstance(model_or_config, nn.Module)
    config = model_or_config.config if is_model else model_or_config
    shapes = _Shapes.of(config)
    if is_model and load_in_4bit is None:
        load_in_4bit = any(type(m).__name__ == "Linear4bit" for m in model_or_config.modules())
    if dtype is None:
        dtype = _compute_dtype(model_or_config) if is_model else torch.bfloat16
    e = _dtype_bytes(dtype)
    rows = batch_size if max_tokens_per_pass is None else max(1, min(batch_size, max_tokens_per_pass // max_length))
    tokens = rows * max_length

    placement = _placement(model_or_config, shapes, device) if is_model else _single(shapes, device)
    weights = (
        _resident_bytes(model_or_config) if is_model else {device: _config_weight_bytes(shapes, e, bool(load_in_4bit))}
    )
    per_layer = _saved_per_token_layer(shapes, e)
    head_device = placement["head"]
    per: dict[str, dict[str, int]] = {}

    def slot(name: str) -> dict[str, int]:
        return per.setdefault(name, dict.fromkeys(("accumulators", "sketch", "activations", "backward"), 0))

    staging = 0  # pinned host buffers of the offloaded adds (both objectives), once for all layers
    acc_per_layer = 4 * (shapes.attention_params() if accumulation == "exact" else shapes.sketch_params(sketch_dim))
    for name, count in placement["layers"].items():
        s = slot(name)
        s["activations"] += count * tokens * per_layer
        s["backward"] = max(s["backward"], _backward_transient(shapes, e, tokens, accumulation, sketch_dim, offload))
        if load_in_4bit:
            s["backward"] += e * shapes.hidden * max(shapes.intermediate, shapes.hidden)  # one dequantized weight
        acc_device = "cpu" if offload else name
        slot(acc_device)["accumulators"] += 2 * count * acc_per_layer
        if offload and name != "cpu":
            staging = max(staging, 2 * OFFLOAD_COPIES_IN_FLIGHT * _staging_bytes(shapes, accumulation, sketch_dim))
        if accumulation == "sketch":
            slot(name)["sketch"] = 4 * shapes.hidden * sketch_dim
    if staging:
        slot("cpu")["accumulators"] += staging
    chunk = ce_chunk_positions(shapes.vocab)
    ce_temp = 3 * 4 * min(chunk, tokens) * shapes.vocab  # the chunk in fp32, its exp/softmax, its gradient
    head = slot(head_device)
    head["activations"] += tokens * 4 * shapes.hidden  # the final norm's fp32 input
    logits = 2 * e * tokens * shapes.vocab + ce_temp
    ablation = 0
    if sensitivity == "ablation":
        replicas = ablation_chunk * tokens
        ablation = e * replicas * shapes.vocab + ce_temp + _forward_transient(shapes, e, replicas)
    devices = {}
    for name in sorted(set(per) | set(weights)):
        s = slot(name)
        on_head = name == head_device
        devices[name] = DeviceMemory(
            weights=int(weights.get(name, 0)),
            accumulators=s["accumulators"],
            sketch=s["sketch"],
            activations=s["activations"],
            backward=s["backward"],
            logits=logits if on_head else 0,
            ablation=ablation if (on_head or name in placement["layers"]) else 0,
        )
    return DiagnosisMemoryPlan(accumulation, rows, tokens, devices)


def _saved_per_token_layer(s: _Shapes, e: int) -> int:
    """Bytes one decoder layer keeps per token from its forward to its backward pass (module docstring)."""
    q = s.heads * s.head_dim
    norms = 2 * 4 * s.hidden
    hooks = e * s.hidden + e * q
    # With a padding mask transformers (5.x) repeats k/v to every query head before SDPA (no GQA kernel then).
    attention = e * 4 * q + 4 * s.heads
    mlp = (3 if s.gated else 2) * e * s.intermediate
    return norms + hooks + attention + mlp


def _backward_transient(s: _Shapes, e: int, tokens: int, accumulation: str, sketch_dim: int, offload: bool) -> int:
    width = max(s.intermediate, s.hidden)
    mlp = tokens * (3 * e * s.intermediate + 2 * e * s.hidden)
    hooks = tokens * 4 * (s.hidden + width + (sketch_dim if accumulation == "sketch" else 0))
    staged = 4 * s.hidden * s.heads * s.head_dim if offload and accumulation == "exact" else 0
    return max(mlp, hooks) + staged


def _staging_bytes(s: _Shapes, accumulation: str, sketch_dim: int) -> int:
    """fp32 bytes of one staging buffer per result shape of one layer (``hooks.HostAdder``): an upper bound, since
    k and v share a shape."""
    if accumulation == "exact":
        return s.attention_params() * 4
    return s.sketch_params(sketch_dim) * 4


def _forward_transient(s: _Shapes, e: int, tokens: int) -> int:
    """Largest no-grad forward transient of one layer: the residual stream, the MLP's gate/up/product."""
    return tokens * e * (3 * s.intermediate + 3 * s.hidden)


def _config_weight_bytes(s: _Shapes, e: int, nf4: bool) -> int:
    linear = s.layers * (s.attention_params() + s.mlp_params())
    other = s.vocab * s.hidden * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden
    return int(linear * (_NF4_BYTES if nf4 else e) + other * e)


def _single(s: _Shapes, device: str) -> dict[str, Any]:
    return {"layers": {device: s.layers}, "head": device}


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        compute = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit (checked against 0.50)
        if isinstance(compute, torch.dtype):
            return compute
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def _placement(model: nn.Module, s: _Shapes, default: str) -> dict[str, Any]:
    """Layers per execution device, and the device of the LM head (where the logits are)."""
    layers: dict[str, int] = {}
    projections = hooked_projections(model, AttentionGeometry.from_model(model))
    for p in projections:
        if p.input_side:
            name = str(execution_device(p.module))
            layers[name] = layers.get(name, 0) + 1
    head = model.get_output_embeddings()
    return {"layers": layers or {default: s.layers}, "head": str(execution_device(head))}


def _resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per device (offloaded ``meta`` weights live elsewhere: not counted)."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # bitsandbytes 4-bit: the absmax of each weight's quant state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and isinstance(getattr(state, "absmax", None), torch.Tensor):
            tensors.append(state.absmax)
    for tensor in tensors:
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        name = str(tensor.device)
        out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
    return out


def free_bytes(device: torch.device | str) -> int:
    """Memory a diagnosis can still allocate on ``device``: CUDA's free memory plus PyTorch's reusable cache
    (reserved but unallocated), or the CPU's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # psutil comes with accelerate; without it, assume everything fits
        return 1 << 62


def choose_plan(
    model: nn.Module,
    *,
    accumulation: str,
    max_tokens_per_pass: int | str | None,
    memory_budget: int | None,
    batch_size: int,
    max_length: int,
    **options: Any,
) -> tuple[DiagnosisMemoryPlan, bool]:
    """The plan ``diagnose()`` runs: for ``"auto"`` settings the most exact, then the largest, micro-batch whose
    added peak fits every device (``memory_budget`` bytes each, else :data:`FREE_MEMORY_SHARE` of its free memory).
    Returns ``(plan, fits)``; when nothing fits, the smallest plan (sketch, one row per pass)."""
    modes = ("exact", "sketch") if accumulation == "auto" else (accumulation,)
    if max_tokens_per_pass == "auto":
        rows_options, row = [], batch_size
        while True:
            rows_options.append(row)
            if row == 1:
                break
            row = max(1, row // 2)
        budgets = [r * max_length for r in rows_options]
    else:
        budgets = [max_tokens_per_pass]
    plan = None
    for mode in modes:
        for tokens in budgets:
            plan = plan_diagnosis_memory(
                model,
                batch_size=batch_size,
                max_length=max_length,
                accumulation=mode,
                max_tokens_per_pass=tokens,
                **options,
            )
            if all(d.added <= _budget(name, memory_budget) for name, d in plan.devices.items()):
                return plan, True
    return plan, False


def _budget(device: str, memory_budget: int | None) -> float:
    if memory_budget is not None:
        return memory_budget
    return FREE_MEMORY_SHARE * free_bytes(device)


def rows_per_pass(tokens_per_pass: int | None, rows: int, length: int) -> int:
    """Rows of one micro-batch of a ``[rows, length]`` batch under a token budget (at least one row)."""
    if tokens_per_pass is None:
        return rows
    return max(1, min(rows, tokens_per_pass // length))


__all__ = ["DeviceMemory", "DiagnosisMemoryPlan", "free_bytes", "plan_diagnosis_memory"]
