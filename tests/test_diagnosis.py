"""diagnose(): per-head gradients, OC and FS checked against independent autograd computations on every architecture,
plus ablation, 4-bit bases, sketching, determinism, multi-process and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from _diag_worker import OPTIONS, inputs, labelled_batches
from launch import launch_two
from models import ARCHS, VOCAB, build_byte_tokenizer, build_tiny_model, save_bnb_sized_llama

from cast_peft.conflict_map import ConflictMap, spearman
from cast_peft.diagnosis import Diagnosis, DiagnosisError, diagnose
from cast_peft.geometry import AttentionGeometry, UnsupportedArchitectureError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared, busy CPU run ~50x faster single-threaded (no thread oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ independent reference
def _o_name(geometry: AttentionGeometry) -> str:
    return next(name for name, roles in geometry.layout.projections.items() if roles == ("o",))


def _autograd_reference(model, batches):
    """Autograd on a copy of ``model``: the gradient of the token-mean response loss of ``batches`` w.r.t. every
    attention projection's weight ([out, in]) and bias, and w.r.t. a gate (at 1) on every head's output.

    Independent of cast_peft.diagnosis: plain ``requires_grad`` weights, ``loss.backward()``, and the loss written
    with ``F.cross_entropy(ignore_index=-100)`` over the full logits."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    geometry = AttentionGeometry.from_model(ref)
    counts = geometry.counts
    modules = dict(ref.named_modules())
    paths = geometry.projections(ref)
    for layer_paths in paths.values():
        for path in layer_paths.values():
            modules[path].weight.requires_grad_(True)
            if modules[path].bias is not None:
                modules[path].bias.requires_grad_(True)
    gates = torch.ones(counts.num_layers, counts.num_heads, requires_grad=True)
    o_index = geometry.role_index(_o_name(geometry), "o")
    head_of = torch.empty(o_index.numel(), dtype=torch.long)
    head_of[o_index.reshape(-1)] = torch.arange(counts.num_heads).repeat_interleave(counts.head_dim)
    handles = [
        modules[paths[layer][_o_name(geometry)]].register_forward_pre_hook(
            lambda m, args, layer=layer: (args[0] * gates[layer][head_of],)
        )
        for layer in paths
    ]
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0
    for b in batches:
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
    (total / n).backward()
    for handle in handles:
        handle.remove()
    grads = {}
    for layer_paths in paths.values():
        for path in layer_paths.values():
            module = modules[path]
            weight = (
                module.weight.grad.t() if isinstance(module, transformers.pytorch_utils.Conv1D) else module.weight.grad
            )
            grads[path] = (weight, None if module.bias is None else module.bias.grad)
    return grads, gates.grad, float(total.detach() / n)


def _head_vector(grads, geometry, paths, layer, unit, roles):
    """Flattened gradient over the given roles of one head (q/o: query head ``unit``; k/v: its KV head)."""
    pieces = []
    for name, carried in geometry.layout.projections.items():
        weight, bias = grads[paths[layer][name]]
        for role in carried:
            if role not in roles:
                continue
            index = geometry.role_index(name, role)[geometry.kv_head_of(unit) if role in ("k", "v") else unit]
            if role == "o":
                pieces.append(weight[:, index].flatten())
            else:
                pieces.append(weight[index].flatten())
                if bias is not None:
                    pieces.append(bias[index])
    return torch.cat(pieces).double()


def _expected_oc(model, grads_s, grads_u, roles, per_kv=False):
    geometry = AttentionGeometry.from_model(model)
    counts, paths = geometry.counts, geometry.projections(model)
    units = counts.num_kv_heads if per_kv else counts.num_heads
    out = torch.zeros(counts.num_layers, units, dtype=torch.float64)
    for layer in range(counts.num_layers):
        for unit in range(units):
            head = unit * counts.group_size if per_kv else unit
            s = _head_vector(grads_s, geometry, paths, layer, head, roles)
            u = _head_vector(grads_u, geometry, paths, layer, head, roles)
            out[layer, unit] = 1 - torch.dot(s, u) / (s.norm() * u.norm())
    return out


# ------------------------------------------------------------------------------------------------ gradients, OC, FS
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_oc_and_taylor_equal_autograd(arch):
    model = build_tiny_model(arch)
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    run = Diagnosis(model, progress=False, accumulation="exact", kv_scoring="shared")
    run.add("safety", safety)
    run.add("utility", utility)
    cmap = run.conflict_map()
    references = {}
    for objective, batches in (("safety", safety), ("utility", utility)):
        grads, gate_grad, loss = _autograd_reference(model, batches)
        references[objective] = grads, gate_grad
        n = run.sizes[objective]["response_tokens"]
        assert cmap.metadata["data"][objective]["mean_loss"] == pytest.approx(loss, rel=1e-5)
        for p in run.projections:
            weight, bias = grads[p.path]
            scale = float(weight.abs().max())
            torch.testing.assert_close(run.grads[objective].weight[p.path] / n, weight, rtol=1e-4, atol=1e-6 * scale)
            if bias is not None and not p.input_side:
                torch.testing.assert_close(run.grads[objective].bias[p.path] / n, bias, rtol=1e-4, atol=1e-7)
    (grads_s, _), (grads_u, gate_u) = references["safety"], references["utility"]
    torch.testing.assert_close(cmap.oc, _expected_oc(model, grads_s, grads_u, "qkvo"), rtol=0, atol=1e-5)
    separate = cmap.rescore(kv_scoring="separate")
    torch.testing.assert_close(separate.oc, _expected_oc(model, grads_s, grads_u, "qo"), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        separate.oc_kv, _expected_oc(model, grads_s, grads_u, "kv", per_kv=True), rtol=0, atol=1e-5
    )
    # Taylor FS: the head-gate gradient at 1; fs_signed is its negative (first-order loss change of removing h).
    torch.testing.assert_close(cmap.fs_signed, -gate_u.double(), rtol=1e-4, atol=1e-7)
    assert (cmap.oc >= 0).all() and (cmap.oc <= 2).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ablation_equals_manual_ablation(arch, record_property):
    model = build_tiny_model(arch)
    safety, utility = labelled_batches(0, 1), labelled_batches(50, 2)
    cmap = diagnose(
        model, None, safety, utility, sensitivity="ablation", kv_scoring="separate", ablation_chunk=3, progress=False
    )
    geometry = AttentionGeometry.from_model(model)
    counts, o_name = geometry.counts, _o_name(geometry)
    o_index = geometry.role_index(o_name, "o")
    modules, paths = dict(model.named_modules()), geometry.projections(model)

    def loss_without(layer, heads):
        ablated = copy.deepcopy(model)
        module = dict(ablated.named_modules())[paths[layer][o_name]] if layer is not None else None
        with torch.no_grad():
            for head in heads:
                if isinstance(module, transformers.pytorch_utils.Conv1D):
                    module.weight[o_index[head]] = 0  # Conv1D stores (in, out): input features are rows
                else:
                    module.weight[:, o_index[head]] = 0
        return _autograd_free_loss(ablated, utility)

    base = _autograd_free_loss(model, utility)
    expected = torch.tensor(
        [[loss_without(layer, [h]) - base for h in range(counts.num_heads)] for layer in range(counts.num_layers)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(cmap.fs_signed, expected, rtol=1e-4, atol=2e-6)
    groups = [
        [
            loss_without(layer, range(g * counts.group_size, (g + 1) * counts.group_size)) - base
            for g in range(counts.num_kv_heads)
        ]
        for layer in range(counts.num_layers)
    ]
    torch.testing.assert_close(cmap.fs_kv_signed, torch.tensor(groups, dtype=torch.float64), rtol=1e-4, atol=2e-6)
    assert modules  # the model itself was not modified
    rho = spearman(cmap.fs, cmap.extras["taylor_signed"].abs())
    record_property("taylor_vs_ablation_spearman", rho)
    print(f"{arch}: Spearman(Taylor FS, ablation FS) = {rho:.3f} on a random tiny model")


def _autograd_free_loss(model, batches) -> float:
    with torch.no_grad():
        total = n = 0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(
                F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
            )
            n += int((b["labels"][:, 1:] != -100).sum())
    return total / n


# ------------------------------------------------------------------------------------------------ 4-bit, peft, sketch
def test_4bit_base_matches_autograd_on_dequantized_weights(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    save_bnb_sized_llama(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    dense_modules = dict(dense.named_modules())
    n_quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            with torch.no_grad():
                dense_modules[name].weight.copy_(
                    bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                )
            n_quantized += 1
    assert n_quantized >= 8
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    cmap = diagnose(model, None, safety, utility, progress=False, kv_scoring="shared")
    grads_s, _, _ = _autograd_reference(dense.eval(), safety)
    grads_u, gate_u, _ = _autograd_reference(dense.eval(), utility)
    torch.testing.assert_close(cmap.oc, _expected_oc(dense, grads_s, grads_u, "qkvo"), rtol=0, atol=1e-4)
    torch.testing.assert_close(cmap.fs_signed, -gate_u.double(), rtol=1e-3, atol=1e-6)


def test_peft_wrapped_model_is_diagnosed_on_its_base():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 1), labelled_batches(50, 1)
    plain = diagnose(model, None, safety, utility, progress=False)
    wrapped = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    cmap = diagnose(wrapped, None, safety, utility, progress=False)
    torch.testing.assert_close(cmap.oc, plain.oc)
    torch.testing.assert_close(cmap.fs, plain.fs)


def test_sketch_is_close_to_exact_and_auto_picks_by_budget():
    model = build_tiny_model("qwen2")
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    exact = diagnose(model, None, safety, utility, progress=False, memory_budget=1 << 40)
    sketch = diagnose(model, None, safety, utility, progress=False, memory_budget=1, sketch_dim=2048)
    assert exact.metadata["options"]["accumulation_used"] == "exact"
    assert sketch.metadata["options"]["accumulation_used"] == "sketch"
    error = (exact.oc - sketch.oc).abs()
    assert 0 < float(error.max()) < 0.15 and float(error.mean()) < 0.05
    torch.testing.assert_close(sketch.fs_signed, exact.fs_signed)  # FS does not go through the sketch
    offloaded = diagnose(model, None, safety, utility, progress=False, accumulation="exact", offload=True)
    torch.testing.assert_close(offloaded.oc, exact.oc)


# ------------------------------------------------------------------------------------------------ determinism, state
def test_same_seed_and_data_give_identical_maps(tmp_path):
    model = build_tiny_model("phi3")
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    for options in ({"accumulation": "exact"}, {"accumulation": "sketch", "sketch_dim": 16, "seed": 5}):
        a = diagnose(model, None, safety, utility, progress=False, **options)
        b = diagnose(model, None, safety, utility, progress=False, **options)
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name
        assert a.metadata == b.metadata
        loaded = ConflictMap.load(a.save(tmp_path / options["accumulation"]))
        assert all(torch.equal(t, loaded.tensors()[name]) for name, t in a.tensors().items())
        assert loaded.metadata == json.loads(json.dumps(a.metadata))
    other = diagnose(model, None, safety, labelled_batches(60, 2), progress=False)
    assert other.metadata["data"]["utility"]["sha256"] != a.metadata["data"]["utility"]["sha256"]


def test_model_state_is_restored_also_after_an_error():
    model = build_tiny_model("llama").train()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    safety, utility = labelled_batches(0, 1), labelled_batches(50, 1)
    diagnose(model, None, safety, utility, progress=False)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    bad = labelled_batches(50, 2)
    for b in bad:
        b["input_ids"][b["input_ids"] == 5] = 6
    bad[1]["input_ids"][0, 6] = 5
    with pytest.raises(DiagnosisError, match="utility loss of batch 1 is nan"):
        diagnose(model, None, safety, bad, progress=False)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not hook for m in model.modules() for hook in (m._forward_hooks, m._forward_pre_hooks))


def test_nonfinite_gradient_names_the_batch():
    model = build_tiny_model("llama")
    o_proj = model.model.layers[1].self_attn.o_proj

    def poison(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: torch.full_like(g, float("inf")))

    handle = o_proj.register_forward_hook(poison)
    with pytest.raises(DiagnosisError, match="gradient of the safety loss in batch 0"):
        diagnose(model, None, labelled_batches(0, 2), labelled_batches(50, 1), progress=False)
    handle.remove()


# ------------------------------------------------------------------------------------------------ data forms, bad input
def _tokenizer():
    # Byte-level with 300+ ids: larger than the tiny models' VOCAB, so diagnosing build_tiny_model with it must fail.
    corpus = ["How do I bake bread? Mix flour and water.", "I can't help with that."]
    return build_byte_tokenizer(corpus, ["<pad>", "<eos>"], eos="<eos>", pad="<pad>", vocab_size=300)


def test_examples_dataset_and_dataloader_inputs():
    import datasets

    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    safety = [{"prompt": f"How do I do harm number {i}?", "response": "I can't help with that."} for i in range(5)]
    utility = ["Mix flour and water, then bake the bread.", "Bread needs flour."]
    cmap = diagnose(model, tokenizer, safety, utility, batch_size=2, max_length=64, progress=False)
    assert cmap.metadata["data"]["safety"]["examples"] == 5 and cmap.metadata["data"]["safety"]["batches"] == 3
    from_dataset = diagnose(
        model, tokenizer, datasets.Dataset.from_list(safety), utility, batch_size=2, max_length=64, progress=False
    )
    torch.testing.assert_close(from_dataset.score, cmap.score, rtol=0, atol=0)
    from cast_peft.data import make_batches

    loader = torch.utils.data.DataLoader(make_batches(tokenizer, safety, batch_size=2, max_length=64), batch_size=None)
    from_loader = diagnose(model, tokenizer, loader, utility, max_length=64, progress=False)
    assert from_loader.metadata["data"] == cmap.metadata["data"]
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        diagnose(build_tiny_model("llama"), tokenizer, safety, utility, progress=False)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        diagnose(model, None, safety, utility, progress=False)


def test_bad_input_is_refused_clearly():
    model = build_tiny_model("llama")
    good = labelled_batches(0, 1)
    with pytest.raises(ValueError, match="safety data is empty"):
        diagnose(model, None, [], good, progress=False)
    with pytest.raises(ValueError, match="No utility data"):
        diagnose(model, None, good, None, progress=False)
    no_response = labelled_batches(0, 1)
    no_response[0]["labels"][1] = -100
    with pytest.raises(ValueError, match=r"utility batch 0: rows \[1\] have no response tokens"):
        diagnose(model, None, good, no_response, progress=False)
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in labelled_batches(0, 1)]
    plain_text = diagnose(model, None, unlabelled, good, progress=False)  # no labels: every attended token is scored
    mask = unlabelled[0]["attention_mask"]
    assert plain_text.metadata["data"]["safety"]["response_tokens"] == int(mask[:, 1:].sum())
    with pytest.raises(ValueError, match="sensitivity='exact' is not one of"):
        diagnose(model, None, good, good, sensitivity="exact")
    opt = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=VOCAB,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="model_type='opt'"):
        diagnose(opt, None, good, good, progress=False)


# ------------------------------------------------------------------------------------------------ multi-process
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_give_the_single_process_map(launcher, tmp_path):
    port = {"torchrun": 29559, "accelerate": 29557}[launcher]
    launch_two([str(Path(__file__).with_name("_diag_worker.py")), str(tmp_path)], port=port, launcher=launcher,
               scratch=tmp_path, timeout=170)  # fmt: skip
    model, safety, utility = inputs()
    single = diagnose(model, None, safety, utility, **OPTIONS)
    maps = [ConflictMap.load(tmp_path / f"rank{r}") for r in range(2)]
    for name, tensor in maps[0].tensors().items():
        assert torch.equal(tensor, maps[1].tensors()[name]), name  # every process returns the same map
        torch.testing.assert_close(tensor, single.tensors()[name], rtol=1e-5, atol=1e-9)
    for objective, data in single.metadata["data"].items():  # same hashes and sizes; losses summed in another order
        reduced = dict(maps[0].metadata["data"][objective])
        assert reduced.pop("mean_loss") == pytest.approx(data["mean_loss"], rel=1e-9)
        assert reduced == {k: v for k, v in data.items() if k != "mean_loss"}
    assert maps[0].metadata["world_size"] == 2
    assert maps[0].select(skip_k=3) == single.select(skip_k=3)
    # Before the process group existed, each process diagnosed every batch alone (the single-process map, bit for
    # bit) and was told how to split the work.
    for rank in range(2):
        alone = ConflictMap.load(tmp_path / f"alone{rank}")
        assert alone.metadata["world_size"] == 1
        for name, tensor in single.tensors().items():
            assert torch.equal(alone.tensors()[name], tensor), name
        message = (tmp_path / f"alone{rank}.txt").read_text()
        assert "WORLD_SIZE=2 but torch.distributed is not initialized" in message, message
        assert "PartialState(cpu=True)" in message


# ------------------------------------------------------------------------------------------------ options
def test_options_object_and_keywords_give_the_same_map():
    from cast_peft import DiagnosisOptions

    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    options = DiagnosisOptions(accumulation="sketch", sketch_dim=16, seed=5, progress=False)
    by_object = diagnose(model, None, safety, utility, options)
    by_keywords = diagnose(model, None, safety, utility, accumulation="sketch", sketch_dim=16, seed=5, progress=False)
    overridden = diagnose(model, None, safety, utility, options, seed=6)  # a keyword overrides the object's field
    for name, tensor in by_object.tensors().items():
        assert torch.equal(tensor, by_keywords.tensors()[name]), name
    assert not torch.equal(by_object.oc, overridden.oc)  # another sketch seed, another estimate
    assert by_object.metadata["options"] == by_keywords.metadata["options"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"sensitivity": "exact"}, "sensitivity='exact' is not one of"),
        ({"accumulation": "fast"}, "accumulation='fast' is not one of"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"sketch_dim": 2.5}, "sketch_dim=2.5 must be a positive integer"),
        ({"max_tokens_per_pass": 0}, "max_tokens_per_pass=0"),
        ({"sensitvity": "taylor"}, r"Unknown diagnosis option\(s\) \['sensitvity'\]"),
    ],
)
def test_bad_options_are_refused_before_any_pass(bad, match):
    from cast_peft import ConfigError

    model = build_tiny_model("llama")

    def no_forward(*args, **kwargs):
        raise AssertionError("the model must not run")

    model.forward = no_forward
    with pytest.raises(ConfigError, match=match):
        diagnose(model, None, labelled_batches(0, 1), labelled_batches(50, 1), progress=False, **bad)
