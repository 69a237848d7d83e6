"""The `cast-peft` CLI end to end on a tiny random model and the starter data (the real demo runs `make demo`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from launch import launch_two
from models import build_tiny_model, build_tiny_tokenizer

from cast_peft import ConflictMap
from cast_peft.cli import main
from cast_peft.models import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_demo_quick_writes_a_complete_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(tiny_dir), "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| LORA |" in report and "| CAST |" in report and "## Verdict" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"base", "lora", "cast"}
    assert results["settings"]["n_skipped"] == round(0.1 * 2 * 4)
    for name in ("conflict_map.png", "tradeoff.png", "map/conflict_map.json", "cast/adapter/cast_config.json"):
        assert (out / name).is_file(), name
    assert str(out / "report.md") in capsys.readouterr().out
    # An existing output folder is refused (and left as it was) unless --overwrite.
    capsys.readouterr()
    assert main(["demo", "--quick", "--model", str(tiny_dir), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_text() == report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo.")], "no temporary folder may be left"
    assert not list(out.rglob(".*.cast-*")), "no temporary folder may be left inside either"


def test_diagnose_train_evaluate_merge(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--max-length", "64"]
    assert main(["diagnose", *common, "--n-calibration", "8", "--output", str(tmp_path / "diag")]) == 0
    skip = {int(k): v for k, v in json.loads((tmp_path / "diag" / "skip_heads.json").read_text()).items()}
    assert sum(map(len, skip.values())) == 1  # 10% of 8 heads

    assert main(["train", *common, "--conflict-map", str(tmp_path / "diag" / "map"), "--steps", "3",
                 "--output", str(tmp_path / "train")]) == 0  # fmt: skip
    adapter = tmp_path / "train" / "adapter"
    cast_config = json.loads((adapter / "cast_config.json").read_text())
    assert {int(k): v for k, v in cast_config["skip_heads"].items()} == skip

    assert main(["evaluate", *common, "--adapter", str(adapter), "--limit", "3", "--max-new-tokens", "4",
                 "--output", str(tmp_path / "eval")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary) == {"harmful_refusal", "safe_over_refusal", "helpful_nll", "kl_drift"}

    assert main(["merge", "--model", str(tiny_dir), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    base, _ = load_model(str(tiny_dir))
    merged, _ = load_model(str(tmp_path / "m"))
    (layer, heads), = skip.items()  # fmt: skip
    d = 8  # head_dim of the tiny llama
    for head in heads:
        rows = slice(head * d, (head + 1) * d)
        q_base = base.model.layers[layer].self_attn.q_proj.weight
        q_merged = merged.model.layers[layer].self_attn.q_proj.weight
        assert torch.equal(q_merged[rows], q_base[rows])
        o_base = base.model.layers[layer].self_attn.o_proj.weight
        assert torch.equal(merged.model.layers[layer].self_attn.o_proj.weight[:, rows], o_base[:, rows])
    assert not torch.equal(merged.model.layers[layer].self_attn.q_proj.weight, q_base)


def test_adapter_from_another_model_is_refused(tiny_dir, tmp_path, capsys):
    other = tmp_path / "other"
    build_tiny_model("qwen3").save_pretrained(other)
    build_tiny_tokenizer().save_pretrained(other)
    assert main(["train", "--model", str(other), "--steps", "1", "--max-length", "32",
                 "--output", str(tmp_path / "t")]) == 0  # fmt: skip
    from cast_peft.tuner.config import CASTLoraConfig

    # A plain-LoRA adapter carries no head geometry; write a CAST one for the qwen3 model and apply it to llama.
    config = CASTLoraConfig(r=2, skip_heads={0: [1]}, attention_geometry=_counts(other))
    config.save_pretrained(tmp_path / "t" / "adapter")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_dir), "--adapter", str(tmp_path / "t" / "adapter"),
                 "--output", str(tmp_path / "e")]) == 2  # fmt: skip
    assert re.search("trained on .*qwen3.*Pass its base", capsys.readouterr().err)


def _counts(path):
    from cast_peft.geometry import AttentionGeometry

    return AttentionGeometry.from_model(load_model(str(path))[0]).counts.to_dict()


def test_unknown_hub_id_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["diagnose", "--model", "nobody/no-such-model", "--output", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "smollm2-135m-instruct" in err
    assert not (tmp_path / "d").exists()


def test_diagnose_with_self_targets_caches_the_answers(tiny_dir, tmp_path):
    # --utility holds prompts only: the model answers them itself; the second run reuses the cached answers.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["How do I kill a Python process?", "Hi."]))
    common = ["diagnose", "--model", str(tiny_dir), "--max-length", "64", "--n-calibration", "4", "--utility",
              str(prompts), "--utility-targets", "self", "--self-target-tokens", "4",
              "--self-target-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--output", str(tmp_path / "b")]) == 0
    first, second = (json.loads((tmp_path / d / "map" / "conflict_map.json").read_text()) for d in "ab")
    targets = [m["metadata"]["utility_targets"] for m in (first, second)]
    assert targets[0]["cache"]["hit"] is False and targets[1]["cache"]["hit"] is True
    assert targets[0]["prompts_sha256"] == targets[1]["prompts_sha256"]
    assert first["tensors_sha256"] == second["tensors_sha256"]  # the same answers give the same map


def _safetensors_dtypes(folder) -> set[str]:
    """The tensor dtypes written in a folder's safetensors headers (read from the bytes: 8-byte length, then JSON)."""
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        raw = file.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def test_cli_on_the_cpu_with_explicit_device_and_dtype(tiny_dir, tmp_path):
    """A real `python -m cast_peft.cli` process: --device cpu --dtype float32 end to end, and the line it logs."""

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cast_peft.cli", "diagnose", "--model", str(tiny_dir), "--device", "cpu",
           "--dtype", "float32", "--n-calibration", "4", "--max-length", "32", "--output", str(tmp_path / "d")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Loading {tiny_dir}: device cpu, dtype float32, device_map None" in result.stderr
    assert (tmp_path / "d" / "map" / "conflict_map.json").is_file()


def test_diagnose_passes_the_hook_precision(tiny_dir, tmp_path):
    out = tmp_path / "d"
    argv = ["diagnose", "--model", str(tiny_dir), "--device", "cpu", "--n-calibration", "4", "--max-length", "32"]
    assert main([*argv, "--hook-precision", "bf16", "--output", str(out)]) == 0
    options = json.loads((out / "map" / "conflict_map.json").read_text())["metadata"]["options"]
    assert options["hook_precision"] == "bf16" and options["hook_precision_used"] == {"cpu": "bfloat16"}


def test_merge_loads_and_saves_in_the_dtype_asked(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--max-length", "32"]
    assert main(["train", *common, "--steps", "1", "--output", str(tmp_path / "t")]) == 0
    adapter = str(tmp_path / "t" / "adapter")
    assert main(["merge", "--model", str(tiny_dir), "--adapter", adapter, "--device", "cpu", "--dtype", "bfloat16",
                 "--output", str(tmp_path / "bf16")]) == 0  # fmt: skip
    assert _safetensors_dtypes(tmp_path / "bf16") == {"BF16"}
    if not torch.cuda.is_available():  # --dtype auto on a CPU: fp32, the old default of merge
        assert main(["merge", "--model", str(tiny_dir), "--adapter", adapter, "--output", str(tmp_path / "auto")]) == 0
        assert _safetensors_dtypes(tmp_path / "auto") == {"F32"}


@pytest.mark.parametrize("command", ["diagnose", "train", "evaluate", "merge", "demo"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_cuda_fails_before_loading(tmp_path, capsys, command):
    # the model folder does not exist: the device error comes first, before any data or model is read
    extra = ["--adapter", str(tmp_path / "no-adapter")] if command == "merge" else []
    argv = [
        command,
        "--model",
        str(tmp_path / "no-model"),
        *extra,
        "--device",
        "cuda",
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU, but torch sees none" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


def test_device_and_dtype_spellings_are_checked(tmp_path, capsys):
    assert main(["diagnose", "--device", "gpu0", "--output", str(tmp_path / "o")]) == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dtype", "float64", "--output", str(tmp_path / "o")])
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------- launched
@pytest.mark.slow
def test_diagnose_under_accelerate_launch_writes_the_single_process_map_once(tiny_dir, tmp_path):
    argv = ["diagnose", "--model", str(tiny_dir), "--device", "cpu", "--n-calibration", "6", "--max-length", "32"]
    done = launch_two(["-m", "cast_peft.cli", *argv, "--output", str(tmp_path / "d")], port=29561,
                      launcher="accelerate", scratch=tmp_path)  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "single")]) == 0
    launched, single = ConflictMap.load(tmp_path / "d" / "map"), ConflictMap.load(tmp_path / "single" / "map")
    assert launched.metadata["world_size"] == 2  # the batches were split, not diagnosed twice
    for name, tensor in single.tensors().items():
        torch.testing.assert_close(launched.tensors()[name], tensor, rtol=1e-5, atol=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accelerate.yaml", "d", "single"]  # no leftovers
    assert done.stdout.count("Conflict map written to") == 1


@pytest.mark.slow
def test_train_under_torchrun_writes_one_adapter(tiny_dir, tmp_path):
    argv = ["train", "--model", str(tiny_dir), "--device", "cpu", "--steps", "2", "--batch-size", "2",
            "--max-length", "32", "--output", str(tmp_path / "t")]  # fmt: skip
    done = launch_two(["-m", "cast_peft.cli", *argv], port=29563)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [".cast_peft_output.json", "adapter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert done.stdout.count("Adapter written to") == 1
