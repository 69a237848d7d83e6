"""Head slices from geometry.py, checked against what each architecture's own forward does with them."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import ARCHS, build_tiny_model, tiny_batch

from cast_peft.geometry import AttentionGeometry, UnsupportedArchitectureError


def _o_inputs(model, batch) -> dict[int, torch.Tensor]:
    """Input of every layer's output projection (the concatenated per-head attention outputs)."""
    geometry = AttentionGeometry.from_model(model)
    modules = dict(model.named_modules())
    captured, handles = {}, []
    for layer, paths in geometry.projections(model).items():
        o_name = next(name for name, roles in geometry.layout.projections.items() if roles == ("o",))
        handles.append(
            modules[paths[o_name]].register_forward_pre_hook(
                lambda module, args, layer=layer: captured.__setitem__(layer, args[0].detach().clone())
            )
        )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return captured


def _zero_rows(model, geometry, layer, role, unit):
    """Zero, in place, the weight rows (and bias) that geometry assigns to ``unit`` of ``role`` in ``layer``."""
    modules = dict(model.named_modules())
    name = next(n for n, roles in geometry.layout.projections.items() if role in roles)
    module = modules[geometry.projections(model)[layer][name]]
    index = geometry.role_index(name, role)[unit]
    with torch.no_grad():
        if isinstance(module, transformers.pytorch_utils.Conv1D):
            module.weight[:, index] = 0
        else:
            module.weight[index] = 0
        if module.bias is not None:
            module.bias[index] = 0


def _head_slice(geometry, head):
    o_name = next(name for name, roles in geometry.layout.projections.items() if roles == ("o",))
    return geometry.role_index(o_name, "o")[head]


@pytest.mark.parametrize("arch", ARCHS)
def test_value_rows_feed_exactly_their_query_heads(arch):
    # Zeroing the v rows of KV head j makes the attention output of exactly the query heads reading j zero: this checks
    # the v slice, the KV grouping and the o-input slice against the architecture's real forward.
    model = build_tiny_model(arch)
    geometry = AttentionGeometry.from_model(model)
    batch = tiny_batch()
    layer, kv_head = 1, geometry.counts.num_kv_heads - 1
    _zero_rows(model, geometry, layer, "v", kv_head)
    o_input = _o_inputs(model, batch)[layer]
    readers = []
    for head in range(geometry.counts.num_heads):
        values = o_input[..., _head_slice(geometry, head)]
        if geometry.kv_head_of(head) == kv_head:
            assert torch.count_nonzero(values) == 0, f"head {head} should read the zeroed KV head {kv_head}"
            readers.append(head)
        else:
            assert values.abs().max() > 1e-4, f"head {head} does not read KV head {kv_head} and must stay non-zero"
    # The grouping tensors say the same as the forward: the heads reading KV head j are its group.
    assert geometry.kv_groups()[kv_head].tolist() == readers
    assert (geometry.kv_heads_of_query_heads() == kv_head).nonzero().flatten().tolist() == readers


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("role", ["q", "k"])
def test_query_and_key_rows_change_exactly_their_heads(arch, role):
    # Zeroing a head's q rows (or its KV head's k rows) flattens its attention pattern: only that head's (or that KV
    # group's) output may change.
    model = build_tiny_model(arch)
    geometry = AttentionGeometry.from_model(model)
    batch = tiny_batch()
    layer = 0
    before = _o_inputs(model, batch)[layer]
    unit = 1 if role == "q" else geometry.counts.num_kv_heads - 1
    _zero_rows(model, geometry, layer, role, unit)
    after = _o_inputs(model, batch)[layer]
    for head in range(geometry.counts.num_heads):
        index = _head_slice(geometry, head)
        changed = (after[..., index] - before[..., index]).abs().max()
        affected = head == unit if role == "q" else geometry.kv_head_of(head) == unit
        if affected:
            assert changed > 1e-5, f"head {head} should change when its {role} rows are zeroed"
        else:
            torch.testing.assert_close(after[..., index], before[..., index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_role_indices_partition_each_projection(arch):
    geometry = AttentionGeometry.from_model(build_tiny_model(arch))
    for name, roles in geometry.layout.projections.items():
        indices = torch.cat([geometry.role_index(name, role).reshape(-1) for role in roles])
        assert sorted(indices.tolist()) == list(range(geometry.features(name)))


@pytest.mark.parametrize("arch", ARCHS)
def test_parse_and_target_regex_select_only_attention(arch):
    import re

    model = build_tiny_model(arch)
    geometry = AttentionGeometry.from_model(model)
    regex = geometry.target_modules_regex()
    attention = {path for paths in geometry.projections(model).values() for path in paths.values()}
    assert len(attention) == 2 * len(geometry.layout.projections)
    for path, _ in model.named_modules():
        assert bool(re.fullmatch(regex, path)) == (path in attention), path
        assert bool(re.fullmatch(regex, f"base_model.model.{path}")) == (path in attention)


def test_gpt2_mlp_c_proj_is_not_attention():
    model = build_tiny_model("gpt2")
    geometry = AttentionGeometry.from_model(model)
    assert geometry.parse("transformer.h.0.mlp.c_proj") is None
    assert geometry.parse("transformer.h.0.attn.c_proj").roles == ("o",)
    # Heads sit on c_proj's inputs and on c_attn's outputs.
    assert geometry.parse("transformer.h.0.attn.c_proj").input_side and geometry.is_input_side("c_proj")
    assert not geometry.parse("transformer.h.0.attn.c_attn").input_side and not geometry.is_input_side("c_attn")


def test_unknown_architecture_is_refused_with_the_supported_list():
    config = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"bloom.*Supported: .*llama.*LAYOUTS") as info:
        AttentionGeometry.from_model(model)
    # The fix it names is in the installed package; a user has no repository (tests/, benchmarks/) to edit.
    assert "tests/" not in str(info.value) and "AttentionLayout entry" in str(info.value)


def test_unexpected_projection_size_is_refused():
    model = build_tiny_model("llama")
    model.config.head_dim = 4  # as if the layout carried channels CAST does not know
    with pytest.raises(UnsupportedArchitectureError, match="refusing to guess"):
        AttentionGeometry.from_model(model)
