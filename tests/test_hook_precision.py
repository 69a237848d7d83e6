"""The hooks' GEMMs (issue 14 item 9): bf16 inputs with fp32 accumulation, one ``x S`` per shared input, and
offloaded sums that never wait on a synchronous copy inside a hook. The CUDA side is in ``tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from _diag_worker import labelled_batches
from models import build_tiny_model
from test_diagnosis import _autograd_reference, _expected_oc
from torch.utils._python_dispatch import TorchDispatchMode

from cast_peft import ConfigError
from cast_peft.diagnosis import Diagnosis, DiagnosisOptions, diagnose
from cast_peft.diagnosis.hooks import HostAdder
from cast_peft.geometry import AttentionGeometry


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bf16_hooks_give_the_autograd_oc_within_bf16_rounding(arch):
    model = build_tiny_model(arch)
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    grads_s, _, _ = _autograd_reference(model, safety)
    grads_u, _, _ = _autograd_reference(model, utility)
    expected = _expected_oc(model, grads_s, grads_u, ("q", "o"))
    fp32 = diagnose(model, None, safety, utility, progress=False, accumulation="exact", hook_precision="fp32")
    bf16 = diagnose(model, None, safety, utility, progress=False, accumulation="exact", hook_precision="bf16")
    assert bf16.metadata["options"]["hook_precision_used"] == {"cpu": "bfloat16"}
    fp32_error = float((fp32.oc.double() - expected).abs().max())
    bf16_error = float((bf16.oc.double() - expected).abs().max())
    # bf16 keeps 8 significant bits: the inputs move by <= 2^-9 relative, the cosine by a few times that.
    assert fp32_error < 1e-5 and 1e-5 < bf16_error < 2e-2, (fp32_error, bf16_error)
    torch.testing.assert_close(bf16.fs_signed, fp32.fs_signed)  # FS is not a GEMM of the hooks


def test_auto_precision_is_fp32_on_the_cpu():
    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 1), labelled_batches(50, 1)
    auto = diagnose(model, None, safety, utility, progress=False, accumulation="exact")
    fp32 = diagnose(model, None, safety, utility, progress=False, accumulation="exact", hook_precision="fp32")
    assert auto.metadata["options"]["hook_precision_used"] == {"cpu": "float32"}
    assert torch.equal(auto.oc, fp32.oc) and torch.equal(auto.fs_signed, fp32.fs_signed)


def test_bad_hook_precision_is_refused_before_any_pass():
    with pytest.raises(ConfigError, match="hook_precision"):
        DiagnosisOptions(hook_precision="fp16")


def _captured(model, geometry):
    """Forward/tensor hooks of the test's own: every projection's input and output gradient of one pass."""
    modules = dict(model.named_modules())
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for paths in geometry.projections(model).values():
        for path in paths.values():

            def hook(module, args, output, path=path):
                seen[path] = {"x": args[0].detach().reshape(-1, args[0].shape[-1])}
                output.register_hook(lambda g: seen[path].__setitem__("g", g.reshape(-1, g.shape[-1])))

            handles.append(modules[path].register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_fp32_sums_are_bit_identical_to_one_plain_gemm(arch, accumulation, precision):
    """On the CPU the fp32 path computes exactly ``acc.addmm_(gᵀ, x)`` (exact) or ``acc.addmm_(g_unitᵀ, x S)``
    with ``S`` the documented seeded matrix (sketch): the numbers of the code before hook_precision existed."""
    model = build_tiny_model(arch)
    geometry = AttentionGeometry.from_model(model)
    batch = labelled_batches(0, 1)[0]
    k = 8
    run = Diagnosis(model, progress=False, accumulation=accumulation, sketch_dim=k, hook_precision=precision)
    seen, handles = _captured(model, geometry)
    try:
        run.add("safety", [batch])
    finally:
        for handle in handles:
            handle.remove()
    accumulator = run.grads["safety"]
    d = geometry.counts.head_dim
    for p in run.projections:
        x, g = seen[p.path]["x"], seen[p.path]["g"]
        if accumulation == "exact":
            expected = torch.zeros(p.out_features, p.in_features).addmm_(g.t(), x)
            assert torch.equal(accumulator.weight[p.path], expected), p.path
        else:
            side = g if p.input_side else x
            generator = torch.Generator().manual_seed(0 * 1_000_003 + side.shape[1])  # seed 0
            sketch = torch.randn(side.shape[1], k, generator=generator) / k**0.5
            other = side @ sketch
            split = x if p.input_side else g
            for role in p.roles:
                index = geometry.role_index(p.name, role).reshape(-1)
                expected = torch.zeros(geometry.units(role) * d, k).addmm_(split[:, index].t(), other)
                assert torch.equal(accumulator.unit[(p.path, role)].view(-1, k), expected), (p.path, role)
        if p.path in accumulator.bias:
            assert torch.equal(accumulator.bias[p.path], torch.zeros(p.out_features) + g.sum(0))


# ------------------------------------------------------------------------------------------------ shared x S
class _CountSketchProducts(TorchDispatchMode):
    """Counts the GEMMs ``[tokens, hidden] @ [hidden, k]``: the products of an input or gradient with ``S``."""

    def __init__(self, hidden: int, k: int):
        super().__init__()
        self.shape, self.count = (hidden, k), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.dtype) and tuple(args[1].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_sketch_computes_x_s_once_per_shared_input():
    model = build_tiny_model("llama")
    counts = AttentionGeometry.from_model(model).counts
    k = 24  # no other GEMM of the tiny model has a [32, 24] right-hand side
    run = Diagnosis(model, progress=False, accumulation="sketch", sketch_dim=k)
    with _CountSketchProducts(model.config.hidden_size, k) as counter:
        run.add("safety", labelled_batches(0, 1))
    # Per layer: one x S for q/k/v (they read the same hidden state) and one g S for o; each was its own GEMM before.
    assert counter.count == 2 * counts.num_layers


# ------------------------------------------------------------------------------------------------ offload
def test_host_adder_sums_with_a_bounded_number_of_copies_in_flight():
    adder = HostAdder(depth=2)
    targets = [torch.zeros(3, 4), torch.zeros(5)]
    values = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    biases = [torch.randn(5, generator=torch.Generator().manual_seed(10 + i)) for i in range(5)]
    for value, bias in zip(values, biases):
        adder.add_(targets[0], value)
        adder.add_(targets[1], bias)
        assert adder.in_flight <= 2
    adder.flush()
    assert adder.in_flight == 0
    expected = torch.zeros(3, 4)
    for value in values:
        expected += value
    assert torch.equal(targets[0], expected)
    expected_bias = torch.zeros(5)
    for bias in biases:
        expected_bias += bias
    assert torch.equal(targets[1], expected_bias)
    assert len(adder.allocated) <= 2 * 2  # buffers are reused: at most `depth` per shape


@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_offloaded_map_equals_the_map_on_device(accumulation):
    model = build_tiny_model("qwen2")
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    kept = diagnose(model, None, safety, utility, progress=False, accumulation=accumulation, sketch_dim=16)
    offloaded = diagnose(
        model, None, safety, utility, progress=False, accumulation=accumulation, sketch_dim=16, offload=True
    )
    assert torch.equal(offloaded.oc, kept.oc) and torch.equal(offloaded.fs_signed, kept.fs_signed)


def test_shared_inputs_are_dropped_once_their_last_hook_has_run(monkeypatch):
    from cast_peft.diagnosis import hooks

    made: list[hooks.HookInput] = []

    class Recorded(hooks.HookInput):
        def __init__(self, x):
            super().__init__(x)
            made.append(self)

    monkeypatch.setattr(hooks, "HookInput", Recorded)
    model = build_tiny_model("llama")
    run = Diagnosis(model, progress=False, accumulation="sketch", sketch_dim=8)
    batch = labelled_batches(0, 1)[0]
    with hooks.HookSession(model, run.projections, run.grads["safety"], None):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
        # one per layer for q/k/v and one for o, each held until the backward pass
        assert len(made) == 2 * model.config.num_hidden_layers
        assert all(m.x is not None for m in made)
        loss.backward()
        # the graph (and its hooks' closures) is still referenced by `loss`; the inputs are gone all the same
        assert all(m.x is None and m.users == 0 and not m._derived for m in made)


def test_bf16_sketch_hooks_run_under_autocast():
    model = build_tiny_model("qwen2")
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    reference = diagnose(model, None, safety, utility, progress=False, accumulation="sketch", sketch_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cmap = diagnose(
            model, None, safety, utility, progress=False, accumulation="sketch", sketch_dim=16, hook_precision="bf16"
        )
    assert float((cmap.oc - reference.oc).abs().max()) < 0.05  # bf16 forward and hooks vs fp32: same map, roughly
