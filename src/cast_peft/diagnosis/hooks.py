"""Per-head gradients from module hooks, for the diagnosis.

The weight gradient of a linear projection ``y = x Wᵀ + b`` is ``∂L/∂W = gᵀ x`` and ``∂L/∂b = Σ g``, with ``x`` the
projection's input and ``g = ∂L/∂y``. A forward hook keeps ``x`` and puts a tensor hook on ``y``; when the backward
pass reaches ``y`` the tensor hook gets ``g`` and adds ``gᵀ x`` to an fp32 accumulator. Autograd itself never needs a
weight gradient, so base weights stay ``requires_grad=False`` and a bitsandbytes 4-bit base works as well (the
gradient is the one of the dequantized weight it computes with). Everything here is in ``nn.Linear`` orientation
(``[out, in]``); transformers' ``Conv1D`` (GPT-2) computes the same ``x W + b`` with ``W`` stored transposed.

Per head only four kinds of block matter (see ``geometry.py``): the q/k/v rows of a unit (output features, plus their
bias entries) and the o-projection's input columns of a head. The cosine of the safety and utility gradient over any
union of such blocks needs only three numbers per block, ``⟨G_s, G_s⟩``, ``⟨G_u, G_u⟩`` and ``⟨G_s, G_u⟩``, which add
up over disjoint blocks; :func:`unit_stats` returns them per role and unit.

Two accumulator layouts:

* exact: the full ``[out, in]`` gradient of every attention projection (1x the attention weights per objective, fp32;
  optionally kept in CPU memory);
* sketch: per unit, the ``[head_dim, in]`` block multiplied by a fixed Gaussian matrix ``S [in, k]`` (entries
  ``N(0, 1/k)``, seeded), i.e. ``gᵀ (x S)``: exact on the head side, a Johnson-Lindenstrauss projection on the hidden
  side. Inner products are unbiased, ``E[⟨A S, B S⟩] = ⟨A, B⟩``; biases stay exact. The same ``S`` serves both
  objectives (and every process), so their inner products are comparable.

The GEMMs run on fp32 inputs or, with ``hook_precision="bf16"`` (the default on CUDA devices with native bf16),
on bf16 inputs, always accumulating in fp32 into fp32 sums (``benchmarks/results/hook_precision.md``: the OC error
this adds is far below the sketch's). The projections that read the same hidden state (q/k/v) share one
:class:`HookInput`, so its cast and its ``x S`` are computed once. With ``offload=True`` the device results reach
the CPU sums through pinned buffers and non-blocking copies (:class:`HostAdder`), never a synchronous copy.
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._core.errors import ConfigError, DiagnosisError
from ..geometry import ROLES, AttentionGeometry, Role, _feature_counts, name_is_input_side


@dataclass(frozen=True)
class HookedProjection:
    """One attention projection the diagnosis hooks: where it is, what it carries and its sizes."""

    layer: int
    name: str
    path: str
    roles: tuple[Role, ...]
    module: nn.Module
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def input_side(self) -> bool:
        return name_is_input_side(self.roles)

    @property
    def device(self) -> torch.device:
        return execution_device(self.module)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on, where its inputs and output gradients arrive: its weights' device, or, for
    weights offloaded by accelerate (``device_map`` with "cpu"/"disk" entries: ``meta`` weights moved in by a hook
    at each forward), its hook's execution device. Never ``meta``: accumulators made there could not be read."""
    weight = next(module.parameters(), None)
    if weight is None:
        return torch.device("cpu")
    if weight.device.type != "meta":
        return weight.device
    # accelerate's AlignDevicesHook, alone or inside a SequentialHook (checked against accelerate 1.15.0)
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or [hook]:
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)
    raise DiagnosisError(
        f"{type(module).__name__} has its weights on the meta device and no accelerate hook that loads them, so it "
        "cannot run. Load the model with real weights (or dispatch it with accelerate's device_map)."
    )


def hooked_projections(model: nn.Module, geometry: AttentionGeometry) -> list[HookedProjection]:
    """Every attention projection of ``model`` in (layer, projection) order; peft wrappers are unwrapped."""
    modules = dict(model.named_modules())
    found = []
    for layer, paths in sorted(geometry.projections(model).items()):
        for name in geometry.layout.projections:
            module = modules[paths[name]]
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            out_features, in_features = _feature_counts(base)
            bias = getattr(base, "bias", None)
            found.append(
                HookedProjection(
                    layer,
                    name,
                    paths[name],
                    geometry.layout.projections[name],
                    base,
                    out_features,
                    in_features,
                    isinstance(bias, torch.Tensor),
                )
            )
    return found


def exact_bytes(projections: list[HookedProjection]) -> int:
    """fp32 bytes of one objective's exact accumulators."""
    return 4 * sum(p.out_features * p.in_features + (p.out_features if p.has_bias else 0) for p in projections)


def sketch_bytes(projections: list[HookedProjection], geometry: AttentionGeometry, sketch_dim: int) -> int:
    """fp32 bytes of one objective's sketched accumulators."""
    d = geometry.counts.head_dim
    total = 0
    for p in projections:
        total += sum(geometry.units(role) * d * sketch_dim for role in p.roles)
        total += p.out_features if p.has_bias else 0
    return 4 * total


class _Sketch:
    """Fixed Gaussian matrices ``[dim, k]`` with ``N(0, 1/k)`` entries, one per hidden size, generated on the CPU."""

    def __init__(self, dim: int, seed: int):
        self.k, self.seed = dim, seed
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def matrix(self, rows: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (rows, device, dtype)
        if key not in self._cache:
            # Generated on the CPU from (seed, rows) so every device and every process gets the same matrix.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rows)
            matrix = torch.randn(rows, self.k, generator=generator, dtype=torch.float32) / self.k**0.5
            self._cache[key] = matrix.to(device=device, dtype=dtype)
        return self._cache[key]


def hook_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The input dtype of the hooks' GEMMs on ``device`` for ``hook_precision`` (``"auto"``: bf16 on CUDA devices
    that compute it natively, compute capability >= 8.0, with a torch that has bf16 -> fp32 GEMMs; fp32 elsewhere,
    the CPU included)."""
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        precision = "bf16" if native and fp32_output_gemms(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"hook_precision={precision!r}: use 'auto', 'fp32' or 'bf16'.")
    return torch.bfloat16 if precision == "bf16" else torch.float32


@functools.cache
def fp32_output_gemms(device: torch.device) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` take bf16 inputs with an fp32 output (``out_dtype``, accumulating into
    an fp32 ``out``) on ``device``: CUDA only, and only in recent torch releases (checked against 2.13), so it is
    tried once, on a 2x2 example, rather than assumed from a version number."""
    if device.type != "cuda":
        return False
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
    acc = torch.ones(2, 2, device=device)
    try:
        product = torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):  # no out_dtype keyword, or no such kernel / dtype combination
        return False
    expected = torch.tensor([[7.0, 10.0], [15.0, 22.0]], device=device)
    return bool(torch.equal(product, expected) and torch.equal(acc, expected + 1))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32, accumulated in fp32, for fp32 or bf16 ``a`` and ``b``."""
    if a.dtype == torch.float32:
        return a @ b
    if fp32_output_gemms(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS bf16 x bf16 -> fp32
    # No bf16 -> fp32 kernel (the CPU). Products of bf16 values are exact in fp32, so this computes the same
    # numbers as that kernel (up to summation order).
    return a.float() @ b.float()


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, fp32 ``acc``, fp32 accumulation, no ``[out, in]`` temporary."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif fp32_output_gemms(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.float(), b.float())  # as in _mm: the same numbers as the bf16 -> fp32 kernel


class HookInput:
    """A projection input kept from the forward pass for the backward hooks of every projection that reads it.

    q/k/v read the same hidden state; their hooks share one ``HookInput``, so what is derived from the input (its
    cast to the GEMM dtype, ``x S``) is computed once and dropped when the last of them has run.
    """

    def __init__(self, x: torch.Tensor):
        self.x: torch.Tensor | None = x
        self.users = 1
        self._derived: dict[Any, torch.Tensor] = {}

    def derived(self, key: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def release(self) -> None:
        """One user is done; the last one frees the input and everything derived from it."""
        self.users -= 1
        if self.users <= 0:
            self.x = None
            self._derived.clear()


#: Offloaded adds in flight (pinned buffers being copied into) before a hook waits for the oldest one.
OFFLOAD_COPIES_IN_FLIGHT = 2


class HostAdder:
    """Adds device results into CPU (offloaded) sums without a synchronous device-to-host copy.

    Each result is copied with ``non_blocking=True`` into a pinned host buffer and an event is recorded after the
    copy; the add on the CPU waits for that event only when ``depth`` copies are in flight already (the oldest is
    completed first) or at :meth:`flush`, which must run before the sums are read (``GradAccumulator`` does).
    Buffers are reused by shape, so at most ``depth`` per shape are ever allocated.
    """

    def __init__(self, depth: int = OFFLOAD_COPIES_IN_FLIGHT):
        self.depth = depth
        self._pending: deque[tuple[Any, torch.Tensor, torch.Tensor]] = deque()  # (event, buffer, target)
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.allocated: list[torch.Tensor] = []  # every buffer made (to check that they are pinned)

    def add_(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target += value`` (``target`` fp32 on the CPU), once the copy has arrived."""
        if len(self._pending) >= self.depth:
            self._complete_oldest()
        cuda = value.device.type == "cuda"
        free = self._free.setdefault(tuple(value.shape), [])
        if free:
            buffer = free.pop()
        else:
            buffer = torch.empty(value.shape, dtype=target.dtype, pin_memory=cuda)
            self.allocated.append(buffer)
        buffer.copy_(value, non_blocking=cuda)
        event = None
        if cuda:  # recorded on the stream that runs the copy (the backward pass's current stream)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(value.device))
        self._pending.append((event, buffer, target))

    def _complete_oldest(self) -> None:
        event, buffer, target = self._pending.popleft()
        if event is not None:
            event.synchronize()
        target += buffer
        self._free[tuple(buffer.shape)].append(buffer)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Complete every pending add (the CPU sums are then up to date)."""
        while self._pending:
            self._complete_oldest()


class GradAccumulator:
    """Sum of one objective's weight gradients over the attention projections (exact or sketched), fp32.

    Args:
        projections: the hooked projections.
        geometry: the head slices.
        sketch_dim: ``None`` for exact accumulators, else the hidden-side sketch width ``k``.
        seed: seed of the sketch matrix.
        offload: keep the accumulators in CPU memory (each batch's contribution is computed on the model's device
            and then added on the CPU, through :class:`HostAdder`).
        hook_precision: input precision of the GEMMs, per device (:func:`hook_dtype`); sums are fp32 always.
    """

    def __init__(
        self,
        projections: list[HookedProjection],
        geometry: AttentionGeometry,
        *,
        sketch_dim: int | None = None,
        seed: int = 0,
        offload: bool = False,
        hook_precision: str = "auto",
    ):
        self.projections, self.geometry = projections, geometry
        self.sketch = _Sketch(sketch_dim, seed) if sketch_dim else None
        self.dtypes = {p.device: hook_dtype(hook_precision, p.device) for p in projections}
        for device in self.dtypes:
            fp32_output_gemms(device)  # tried now: the try syncs, which it must not do inside a hook
        self.host = HostAdder()
        self._index = {
            (p.path, role): geometry.role_index(p.name, role).reshape(-1).to(p.device)
            for p in projections
            for role in p.roles
        }
        self.weight: dict[str, torch.Tensor] = {}
        self.unit: dict[tuple[str, Role], torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        d = geometry.counts.head_dim
        for p in projections:
            device = torch.device("cpu") if offload else p.device
            if self.sketch is None:
                self.weight[p.path] = torch.zeros(p.out_features, p.in_features, device=device)
            else:
                for role in p.roles:
                    self.unit[(p.path, role)] = torch.zeros(geometry.units(role), d, self.sketch.k, device=device)
            if p.has_bias and not p.input_side:
                self.bias[p.path] = torch.zeros(p.out_features, device=device)
            if self.sketch is not None:  # made now: a host-to-device copy inside a hook would sync
                self.sketch.matrix(p.out_features if p.input_side else p.in_features, p.device, self.dtypes[p.device])

    @torch.no_grad()
    def add(self, p: HookedProjection, x: torch.Tensor | HookInput, g: torch.Tensor) -> torch.Tensor:
        """Add one backward pass's ``gᵀ x`` (and ``Σ g`` for a bias); ``x`` may be a :class:`HookInput` shared with
        the other projections that read it (this call is then one of its users).

        Returns ``Σ x + Σ g`` (fp32): finite exactly when every input and output gradient entry is, so one check per
        batch finds a NaN/inf gradient without a pass over the accumulators (a NaN activation at a padded position,
        where g is 0, would still poison ``gᵀ x``).
        """
        source = x if isinstance(x, HookInput) else HookInput(x.detach())
        # The backward pass inherits the caller's autocast (e.g. inside accelerator.autocast()), which would run the
        # matmuls below in bf16/fp16 and make addmm_ into the fp32 sums fail: the precision is chosen here.
        try:
            with torch.autocast(g.device.type, enabled=False):
                return self._add(p, source, g)
        finally:
            source.release()

    def _add(self, p: HookedProjection, source: HookInput, g: torch.Tensor) -> torch.Tensor:
        dtype = self.dtypes[p.device]
        x = source.derived(dtype, lambda: source.x.reshape(-1, source.x.shape[-1]).to(dtype))
        g_raw = g.reshape(-1, g.shape[-1])
        g = g_raw.to(dtype)
        check = x.sum(dtype=torch.float32) + g.sum(dtype=torch.float32)
        if self.sketch is None:
            acc = self.weight[p.path]
            if acc.device == x.device:
                _addmm_(acc, g.t(), x)  # in place: no [out, in] temporary
            else:
                self.host.add_(acc, _mm(g.t(), x))
        else:
            # Output-side units: (g_unit)ᵀ (x S); input-side (o) units: (x_unit)ᵀ (g S). Both are [units, d, k].
            if p.input_side:
                other = _mm(g, self.sketch.matrix(g.shape[1], g.device, dtype)).to(dtype)
            else:  # once per input: q/k/v share it
                other = source.derived(
                    ("sketch", dtype), lambda: _mm(x, self.sketch.matrix(x.shape[1], x.device, dtype)).to(dtype)
                )
            split = x if p.input_side else g
            for role in p.roles:
                acc = self.unit[(p.path, role)]
                block = split.index_select(1, self._index[(p.path, role)]).t()
                if acc.device == x.device:
                    _addmm_(acc.view(-1, acc.shape[-1]), block, other)
                else:
                    self.host.add_(acc, _mm(block, other).view(acc.shape))
        if p.path in self.bias:
            bias = self.bias[p.path]
            total = g_raw.sum(0, dtype=torch.float32)  # from the uncast gradient: exact whatever the GEMM dtype
            if bias.device == total.device:
                bias += total
            else:
                self.host.add_(bias, total)
        return check

    def flush(self) -> None:
        """Wait for the offloaded adds in flight (a no-op without ``offload``)."""
        self.host.flush()

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every accumulator tensor, in a fixed order (for all-reduce across processes)."""
        self.flush()
        for store in (self.weight, self.unit, self.bias):
            for key in sorted(store):
                yield store[key]

    def blocks(self, p: HookedProjection, role: Role) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([units, n] weight block, [units, head_dim] bias block or None)`` of ``role`` in projection ``p``."""
        self.flush()
        units, d = self.geometry.units(role), self.geometry.counts.head_dim
        if self.sketch is not None:
            weight = self.unit[(p.path, role)].reshape(units, -1)
        else:
            full, index = self.weight[p.path], self._index[(p.path, role)].to(self.weight[p.path].device)
            if p.input_side:  # columns of the output projection: [out, units*d] -> [units, d, out]
                weight = full.index_select(1, index).t().reshape(units, -1)
            else:
                weight = full.index_select(0, index).reshape(units, -1)
        bias = None
        if p.path in self.bias:
            bias = self.bias[p.path].index_select(0, self._index[(p.path, role)].to(self.bias[p.path].device))
            bias = bias.view(units, d)
        return weight, bias


def unit_stats(safety: GradAccumulator, utility: GradAccumulator) -> dict[Role, torch.Tensor]:
    """Per role, ``[layers, units, 3]`` float64 of ``(⟨G_s,G_s⟩, ⟨G_u,G_u⟩, ⟨G_s,G_u⟩)`` over each unit's block.

    The accumulators hold sums over tokens (not yet divided by the token counts).
    """
    geometry = safety.geometry
    counts = geometry.counts
    stats = {role: torch.zeros(counts.num_layers, geometry.units(role), 3, dtype=torch.float64) for role in ROLES}
    for p in safety.projections:
        for role in p.roles:
            (ws, bs), (wu, bu) = safety.blocks(p, role), utility.blocks(p, role)
            parts = [(ws, wu)] + ([(bs, bu)] if bs is not None else [])
            for s, u in parts:
                s, u = s.double(), u.double().to(s.device)
                block = torch.stack([(s * s).sum(1), (u * u).sum(1), (s * u).sum(1)], dim=1)
                stats[role][p.layer] += block.cpu()
    return stats


class TaylorAccumulator:
    """``Σ_tokens ⟨a_h, ∂L/∂a_h⟩`` per layer and head, ``a_h`` = head h's slice of the o-projection input (float64).

    That sum is the gradient of a gate multiplying head h's output, at gate = 1; ``-`` it is the first-order estimate
    of the loss change when the head is removed.
    """

    def __init__(self, geometry: AttentionGeometry, o_name: str):
        self._shape = (geometry.counts.num_layers, geometry.counts.num_heads)
        self._index = geometry.role_index(o_name, "o")
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (index, sums)

    @torch.no_grad()
    def add(self, layer: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):  # fp32 sums whatever autocast the caller runs under
            per_feature = (a.reshape(-1, a.shape[-1]).float() * g.reshape(-1, g.shape[-1]).float()).sum(0)
        device = per_feature.device
        if device not in self._on:  # kept on the device: no sync per layer
            self._on[device] = (self._index.to(device), torch.zeros(self._shape, dtype=torch.float64, device=device))
        index, sums = self._on[device]
        per_head = per_feature[index].sum(1)
        sums[layer] += per_head.double()
        return per_head.sum()

    @property
    def values(self) -> torch.Tensor:
        """``[layers, heads]`` float64 sums on the CPU."""
        total = torch.zeros(self._shape, dtype=torch.float64)
        for _, sums in self._on.values():
            total += sums.cpu()
        return total


class HookSession:
    """Hooks for one pass over a set of batches; a context manager that leaves the model as it found it.

    On entry: every parameter gets ``requires_grad=False`` (nothing but the hooks needs weight gradients, and the
    user's ``.grad`` stays untouched), the model goes to eval mode (no dropout: the map is deterministic; no
    gradient-checkpoint recomputation, which would fire the hooks twice) and the input embeddings' output is made
    to require grad, so the backward pass reaches every layer. On exit (also on error) all of that is undone.
    """

    def __init__(
        self,
        model: nn.Module,
        projections: list[HookedProjection],
        accumulator: GradAccumulator | None,
        taylor: TaylorAccumulator | None,
    ):
        self.model, self.projections = model, projections
        self.accumulator, self.taylor = accumulator, taylor
        self.check: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._last_input: tuple[weakref.ref, weakref.ref] | None = None  # (input tensor, its HookInput)

    def __enter__(self) -> HookSession:
        self._flags = [(param, param.requires_grad) for param in self.model.parameters()]
        self._training = self.model.training
        try:
            for param, _ in self._flags:
                param.requires_grad_(False)
            self.model.eval()
            embeddings = self.model.get_input_embeddings()
            self._handles.append(embeddings.register_forward_hook(_require_grad))
            for p in self.projections:
                if p.input_side and self.taylor is not None:
                    self._handles.append(p.module.register_forward_pre_hook(self._alias_hook(p)))
                if self.accumulator is not None:
                    self._handles.append(p.module.register_forward_hook(self._capture_hook(p)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.accumulator is not None:
            self.accumulator.flush()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self.model.train(self._training)

    def _capture_hook(self, p: HookedProjection):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = self._shared_input(args[0])
            output.register_hook(lambda g: self.check.append(self.accumulator.add(p, x, g)))

        return hook

    def _shared_input(self, x: torch.Tensor) -> HookInput:
        """The :class:`HookInput` of ``x``: the one of the previous projection when it read the very same tensor
        (q/k/v run one after the other on the layer's hidden state), else a new one. Held by weak references, so
        nothing here outlives the backward pass."""
        if self._last_input is not None and self._last_input[0]() is x:
            shared = self._last_input[1]()
            if shared is not None and shared.x is not None:
                shared.users += 1
                return shared
        shared = HookInput(x.detach())
        self._last_input = (weakref.ref(x), weakref.ref(shared))
        return shared

    def _alias_hook(self, p: HookedProjection):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            a = args[0]
            if not (torch.is_grad_enabled() and a.requires_grad):
                return None
            # A fresh view gets its own autograd node, so its gradient is exactly the output projection's share
            # (the gradient of a head gate placed right before it), whatever else reads the attention output.
            alias = a.view_as(a)
            kept = alias.detach()
            alias.register_hook(lambda g: self.check.append(self.taylor.add(p.layer, kept, g)))
            return (alias, *args[1:])

        return hook

    def gradients_finite(self) -> bool:
        """Whether everything added since the last call was finite (one device sync per batch, which is also when
        the offloaded adds in flight are completed)."""
        if self.accumulator is not None:
            self.accumulator.flush()
        if not self.check:
            return True
        ok = bool(torch.isfinite(torch.stack([c.to(self.check[0].device) for c in self.check]).sum()))
        self.check.clear()
        return ok


def _require_grad(module: nn.Module, args: tuple, output: Any) -> Any:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.requires_grad_(True)
    return None
