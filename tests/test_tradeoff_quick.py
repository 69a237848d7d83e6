"""`benchmarks/tradeoff.py --quick` end to end on a tiny random Llama (every method, both regimes), and resuming."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from shared_data import available  # noqa: E402


pytestmark = pytest.mark.skipif(
    not available("safety_tuned_llamas"), reason="needs the benchmark data (../shared/data)"
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_quick_study_runs_resumes_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    import tradeoff

    results = tmp_path / "results"
    report = tradeoff.main(["--quick", "--model", str(tiny_model_dir), "--results", str(results)])
    runs = sorted(p.relative_to(results / "runs").as_posix() for p in (results / "runs").rglob("*.json"))
    methods = ["lora", "cast-10", "random-10", "oc-10", "fs-10", "pcgrad", "pilot-10"]
    assert runs == sorted(["base.json"] + [f"{g}/{m}__seed0.json" for g in ("mixed", "safety") for m in methods])

    text = report.read_text()
    assert "QUICK" in text and "Verdict" in text and "Spearman(OC, FS)" in text
    assert "not run**: none" in text
    # one row per run in the per-seed table, baselines before CAST and its controls
    section = text.split("Per run:")[1].split("## ")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in section.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "lora", "pcgrad", "cast-10", "pilot-10", "random-10", "oc-10", "fs-10"
    ]  # fmt: skip
    assert (
        (results / "pareto.png").stat().st_size > 0
        and (results / "xstest_per_seed.png").stat().st_size > 0
        and (results / "conflict_map.png").exists()
    )

    cast = json.loads((results / "runs" / "safety" / "cast-10__seed0.json").read_text())
    assert cast["n_skipped"] == 1 and cast["command"].startswith("python benchmarks/tradeoff.py --quick")
    for key in (
        "harmful_refusal",
        "xstest_over_refusal",
        "helpful_nll",
        "kl_drift",
        "wikitext_ppl",
        "mc_arc_easy_acc",
    ):
        assert key in cast["summary"]
    # pilot-10 skips the top heads of its regime's pilot map: one diagnosed on other (trained, merged) weights.
    from cast_peft import ConflictMap

    base_map = ConflictMap.load(results / "map")
    for regime in ("safety", "mixed"):
        pilot_map = ConflictMap.load(results / "map_pilot" / regime)
        assert not torch.equal(pilot_map.oc, base_map.oc)
        pilot = json.loads((results / "runs" / regime / "pilot-10__seed0.json").read_text())
        expected = {str(layer): list(heads) for layer, heads in pilot_map.select(skip_ratio=0.1).items()}
        assert pilot["skip_heads"] == expected
    assert "Does the conflict appear during training?" in text
    pcgrad = json.loads((results / "runs" / "mixed" / "pcgrad__seed0.json").read_text())
    assert pcgrad["n_skipped"] == 0 and pcgrad["pcgrad"]["steps_logged"] == 2

    # Resuming: every run is present, so nothing is trained again and the files are untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*.json")}
    tradeoff.main(["--quick", "--model", str(tiny_model_dir), "--results", str(results)])
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*.json")} == stamps

    # Other measurement settings are refused for the same folder.
    with pytest.raises(SystemExit, match="other settings"):
        tradeoff.main(["--quick", "--model", str(tiny_model_dir), "--results", str(results), "--steps", "3"])


def test_quick_lookalike_study_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--study lookalike`` (issue 15): the look-alike map with self targets, the generic map beside it, the
    held-out look-alike sets per set and pooled, and the report's comparison sections."""
    import _tradeoff_lib as lib
    import lookalike as la
    import tradeoff

    from cast_peft import ConflictMap

    results = tmp_path / "lookalike"
    args = ["--quick", "--study", "lookalike", "--model", str(tiny_model_dir), "--results", str(results),
            "--methods", "base,lora,cast-10,random-10"]  # fmt: skip
    report = tradeoff.main(args)
    runs = sorted(p.relative_to(results / "runs").as_posix() for p in (results / "runs").rglob("*.json"))
    assert runs == ["base.json", "safety/cast-10__seed0.json", "safety/lora__seed0.json",
                    "safety/random-10__seed0.json"]  # fmt: skip

    # The map: the same 8 safety pairs as the generic map, the first 8 look-alike calibration prompts answered by the
    # model itself; CAST skips the look-alike map's top heads.
    cmap, generic = ConflictMap.load(results / "map"), ConflictMap.load(results / "map_generic")
    targets = cmap.metadata["utility_targets"]
    prompts = [r["prompt"] for r in la.xstest_split("calibration")[:8]]
    assert targets["source"] == "self" and targets["n_prompts"] == 8 and targets["max_new_tokens"] == 8
    assert targets["prompts_sha256"] == hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    assert cmap.metadata["data"]["safety"]["sha256"] == generic.metadata["data"]["safety"]["sha256"]
    assert "utility_targets" not in generic.metadata and not torch.equal(cmap.oc, generic.oc)
    cast = json.loads((results / "runs" / "safety" / "cast-10__seed0.json").read_text())
    assert cast["skip_heads"] == {str(layer): list(h) for layer, h in cmap.select(skip_ratio=0.1).items()}

    # Per-set over-refusal, and the pooled rate from the items themselves.
    summary, details = cast["summary"], cast["details"]
    flags = [it["refused"] for key in ("safe", "safe_physical_safety_safe", "safe_i_alpaca")
             for it in details[key]["items"]]  # fmt: skip
    assert len(flags) == 12 and summary["lookalike_over_refusal"] == sum(flags) / 12
    assert {it["prompt"] for it in details["safe"]["items"]} <= {r["prompt"] for r in la.xstest_split("evaluation")}
    for key in ("xstest_over_refusal", "physical_safety_over_refusal", "i_alpaca_over_refusal"):
        assert 0.0 <= summary[key] <= 1.0

    text = report.read_text()
    assert "LOOK-ALIKE" in text and "Over-refusal per held-out look-alike set" in text
    assert "## The look-alike map against the generic map" in text and "Global gradient cosine" in text
    assert "over-refusal pooled over the held-out look-alike sets" in text and "Self targets: 8 look-alike" in text

    # Its own fingerprint; the committed generic studies keep theirs.
    pinned = json.loads((results / "settings.json").read_text())
    assert pinned["settings"]["study"] == "lookalike" and "self_target_tokens" in pinned["settings"]
    committed = Path(tradeoff.ROOT) / "reduced" / "settings.json"
    if committed.exists():
        old = json.loads(committed.read_text())
        settings = tradeoff.resolve_settings(tradeoff.parse_args(["--profile", "reduced"]))
        assert lib.fingerprint(settings) == old["fingerprint"]

    # Resuming reads the maps and the runs; no run is repeated and the self targets were cached once.
    assert len(list((results / "self_targets").iterdir())) == 1

    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for folder in ("runs", "map", "map_generic", "self_targets")
                for p in (results / folder).rglob("*")}  # fmt: skip

    before = stamps()
    tradeoff.main(args)
    assert stamps() == before
