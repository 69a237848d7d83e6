"""`benchmarks/tradeoff.py --mode full --quick` end to end on a tiny random Llama (issue 16): the learning rate is
calibrated on the all-heads run before any skip run, and every skipped head's slices are bit-identical to the base
after training (the run's ``FrozenHeads.verify()`` and a comparison with the saved base weights made here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from models import TINY_CONFIGS, build_tiny_model, build_tiny_tokenizer  # noqa: E402
from shared_data import available  # noqa: E402


pytestmark = pytest.mark.skipif(
    not available("safety_tuned_llamas"), reason="needs the benchmark data (../shared/data)"
)

# Tiny Llama: 2 layers x 4 heads, 2 KV heads (groups of 2). Skipping 60% (5 of 8 heads) forces at least one whole KV
# group (4 groups hold at most 4 heads without completing one), so k/v freezing is always exercised.
CONFIG = TINY_CONFIGS["llama"]
HEADS, KV, LAYERS = CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.num_hidden_layers
D = CONFIG.hidden_size // HEADS
G = HEADS // KV


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _frozen_slices(skip: dict[int, list[int]]) -> list[tuple[str, int, slice]]:
    """(parameter name, dim, index range) of every frozen slice, from the Llama layout written out by hand."""
    out = []
    for layer, heads in skip.items():
        attn = f"model.layers.{layer}.self_attn"
        for h in heads:
            out += [(f"{attn}.q_proj.weight", 0, slice(h * D, (h + 1) * D)),
                    (f"{attn}.o_proj.weight", 1, slice(h * D, (h + 1) * D))]  # fmt: skip
        for kv in range(KV):
            if all(h in heads for h in range(kv * G, (kv + 1) * G)):
                out += [(f"{attn}.k_proj.weight", 0, slice(kv * D, (kv + 1) * D)),
                        (f"{attn}.v_proj.weight", 0, slice(kv * D, (kv + 1) * D))]  # fmt: skip
    return out


def _check_run(state: dict, base: dict, skip: dict[int, list[int]], mlp_trained: bool) -> None:
    frozen = _frozen_slices(skip)
    trained_mask = {}
    for name, dim, sl in frozen:
        assert torch.equal(_bits(state[name].narrow(dim, sl.start, sl.stop - sl.start)),
                           _bits(base[name].narrow(dim, sl.start, sl.stop - sl.start))), name  # fmt: skip
        mask = trained_mask.setdefault(name, torch.ones_like(base[name], dtype=torch.bool))
        mask.narrow(dim, sl.start, sl.stop - sl.start).fill_(False)
    for name, value in base.items():
        attention = any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if attention:
            mask = trained_mask.get(name, torch.ones_like(value, dtype=torch.bool))
            # Every entry that trains moved (AdamW's first step moves each entry with a non-zero gradient by ~lr).
            assert bool((state[name] != value)[mask].all()), name
        elif ".mlp." in name and mlp_trained:
            assert not torch.equal(state[name], value), name
        else:  # embeddings, norms (and the MLP in mode full) never train
            assert torch.equal(_bits(state[name].float()), _bits(value.float())), name


def test_full_mode_calibrates_then_runs_with_exactly_frozen_heads(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    import _tradeoff_lib as lib
    import tradeoff
    from transformers import AutoModelForCausalLM

    results = tmp_path / "full"
    methods = "base,full,cast-10,cast-60,random-depth-60,random-kv-60"
    common = ["--quick", "--mode", "full", "--model", str(tiny_model_dir), "--results", str(results)]

    # No learning rate pinned yet: every training run is refused before any work.
    with pytest.raises(SystemExit, match="no calibrated learning rate"):
        tradeoff.main([*common, "--methods", methods])
    assert not results.exists()
    with pytest.raises(SystemExit, match="--mode full calibrates"):
        tradeoff.main([*common, "--methods", methods, "--set", "learning_rate=1e-3"])
    with pytest.raises(SystemExit, match="needs a LoRA adapter"):
        tradeoff.main([*common, "--methods", "base,lora", "--calibrate-lr", "1e-3"])

    # Snapshot each model right after training (before evaluation and before the handle is removed).
    trained: list[dict] = []
    original = lib.train_full

    def spy(model, tokenizer, train_data, skip, settings, seed, learning_rate, output_dir):
        handle = original(model, tokenizer, train_data, skip, settings, seed, learning_rate, output_dir)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trained.append({"skip": skip, "lr": learning_rate, "state": state, "handle": handle})
        return handle

    monkeypatch.setattr(lib, "train_full", spy)
    report = tradeoff.main([*common, "--methods", methods, "--calibrate-lr", "1e-3,3e-3"])

    # Calibration: `full` at the smallest candidate first; it reaches the quick profile's target of 0, so the larger
    # one is never trained (it could not be chosen); then the skip runs at that lr. The chosen calibration run is the
    # study's full run.
    assert [(t["lr"], bool(t["skip"])) for t in trained[:1]] == [(1e-3, False)]
    assert all(t["lr"] == 1e-3 and t["skip"] for t in trained[1:]) and len(trained) == 5
    record = json.loads((results / "settings.json").read_text())["calibration"]
    assert record["chosen"] == 1e-3 and record["candidates"] == [1e-3, 3e-3] and record["trained"] == [1e-3]
    assert set(record["summary"]) == {"0.001"}
    full_run = json.loads((results / "runs" / "safety" / "full__seed0.json").read_text())
    assert full_run["calibration_run"] and full_run["summary"] == record["summary"]["0.001"]["safety"]
    assert full_run["n_skipped"] == 0 and full_run["frozen_check"] is None

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    runs = {p.stem.split("__")[0]: json.loads(p.read_text()) for p in (results / "runs" / "safety").glob("*.json")}
    assert sorted(runs) == sorted(methods.split(",")[1:])
    # All heads: every attention entry moved, nothing else did.
    _check_run(trained[0]["state"], base, {}, mlp_trained=False)
    for name, t in zip(methods.split(",")[2:], trained[1:]):  # runs train in --methods order
        run = runs[name]
        assert run["skip_heads"] == {str(k): v for k, v in t["skip"].items()}
        _check_run(t["state"], base, t["skip"], mlp_trained=False)
        # FrozenHeads.verify() ran in the study after training, and counted the entries written out here.
        n_frozen = sum(
            base[p].narrow(dim, s.start, s.stop - s.start).numel() for p, dim, s in _frozen_slices(t["skip"])
        )
        assert run["frozen_check"]["frozen_entries"] == n_frozen
        assert run["mode"] == "full" and run["learning_rate"] == 1e-3 and run["summary"]["kl_drift"] > 0
    skip60 = runs["cast-60"]["skip_profile"]
    assert skip60["frozen_kv_heads"] >= 1
    assert runs["random-kv-60"]["skip_profile"]["frozen_kv_heads"] == skip60["frozen_kv_heads"]
    assert runs["random-depth-60"]["skip_profile"]["heads_per_layer"] == skip60["heads_per_layer"]

    text = report.read_text()
    assert "CAST vs full fine-tuning vs controls" in text and "Chosen: **lr 0.001**" in text
    assert "Not trained (larger than the chosen lr): 0.003." in text
    assert "vs full" in text and "below random-kv-60" in text and "| random-depth-60 |" in text

    # Resuming trains nothing; calibrating again on other candidates is refused.
    count = len(trained)
    tradeoff.main([*common, "--methods", methods, "--calibrate-lr", "1e-3,3e-3"])
    tradeoff.main([*common, "--methods", methods])
    assert len(trained) == count
    with pytest.raises(SystemExit, match="calibrated already"):
        tradeoff.main([*common, "--methods", methods, "--calibrate-lr", "1e-4"])
    with pytest.raises(SystemExit, match="calibrated on regimes"):
        tradeoff.main([*common, "--methods", methods, "--regimes", "safety,mixed"])


def test_full_mlp_mode_trains_the_mlp_too(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    import _tradeoff_lib as lib
    import tradeoff
    from transformers import AutoModelForCausalLM

    trained: list[dict] = []
    original = lib.train_full

    def spy(model, *args):
        handle = original(model, *args)
        trained.append({"skip": args[2], "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        return handle

    monkeypatch.setattr(lib, "train_full", spy)
    results = tmp_path / "mlp"
    tradeoff.main(["--quick", "--mode", "full-mlp", "--model", str(tiny_model_dir), "--results", str(results),
                   "--methods", "base,full,cast-60", "--calibrate-lr", "1e-3"])  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert len(trained) == 2 and trained[1]["skip"]
    for t in trained:
        _check_run(t["state"], base, t["skip"], mlp_trained=True)


def test_lora_mode_runs_the_confound_controls(tiny_model_dir: Path, tmp_path: Path):
    import tradeoff

    from cast_peft import ConflictMap

    results = tmp_path / "lora"
    tradeoff.main(["--quick", "--model", str(tiny_model_dir), "--results", str(results), "--regimes", "safety",
                   "--methods", "base,lora,random-depth-60,random-kv-60"])  # fmt: skip
    cast = ConflictMap.load(results / "map").select(skip_ratio=0.6)
    depth = json.loads((results / "runs" / "safety" / "random-depth-60__seed0.json").read_text())["skip_heads"]
    kv = json.loads((results / "runs" / "safety" / "random-kv-60__seed0.json").read_text())["skip_heads"]
    assert {int(k): len(v) for k, v in depth.items()} == {k: len(v) for k, v in cast.items()}

    def whole_groups(skip: dict) -> int:
        return sum(all(h in hs for h in range(g * G, (g + 1) * G)) for hs in skip.values() for g in range(KV))

    assert whole_groups(kv) == whole_groups(cast) >= 1
    assert sum(map(len, kv.values())) == sum(map(len, cast.values())) == 5


def test_full_mode_evaluates_the_base_alone_without_a_calibration(tiny_model_dir: Path, tmp_path: Path):
    import tradeoff

    # Nothing trains, so no learning rate is needed: the base run and the map are made, and calibration is left for
    # the first invocation that trains.
    results = tmp_path / "base_only"
    report = tradeoff.main(["--quick", "--mode", "full", "--model", str(tiny_model_dir), "--results", str(results),
                            "--methods", "base"])  # fmt: skip
    assert (results / "runs" / "base.json").exists() and (results / "map" / "conflict_map.json").exists()
    assert "calibration" not in json.loads((results / "settings.json").read_text())
    assert report is not None and "Runs present: 0 trained + base" in report.read_text()


def test_calibration_trains_every_candidate_when_none_reaches_the_target(tiny_model_dir: Path, tmp_path: Path):
    import tradeoff

    # A target of 101% harmful refusal cannot be reached: every candidate is trained (a failing one never stops the
    # search), then the run stops with an error that names the fix and pins nothing.
    results = tmp_path / "unreachable"
    with pytest.raises(SystemExit, match="No candidate lr reaches.*add larger learning rates"):
        tradeoff.main(["--quick", "--mode", "full", "--model", str(tiny_model_dir), "--results", str(results),
                       "--methods", "base,full,cast-60", "--calibrate-lr", "1e-3,3e-3",
                       "--set", "calibration_target=1.01"])  # fmt: skip
    assert sorted(p.name for p in (results / "calibration" / "safety").iterdir()) == [
        "full__lr0.001__seed0.json",
        "full__lr0.003__seed0.json",
    ]
    assert "calibration" not in json.loads((results / "settings.json").read_text())
    assert not (results / "runs" / "safety").exists()
