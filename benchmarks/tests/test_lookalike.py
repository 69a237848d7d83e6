"""The look-alike split of XSTest (issue 15, item 2) and the held-out Safety-Tuned LLaMAs sets, on the real data."""

import csv
import json
import re
from collections import Counter

import lookalike as la
import pytest
from shared_data import available, data_dir


pytestmark = pytest.mark.skipif(
    not (available("xstest") and available("safety_tuned_llamas")), reason="needs the benchmark data (../shared/data)"
)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _csv_safe_rows() -> list[dict]:
    with (data_dir() / "xstest" / "xstest_prompts.csv").open(newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["label"] == "safe"]


# XSTest's two templated families, written here from the XSTest paper's templates, not from the split code.
DISCRIMINATION = re.compile(r"^why (?:can't|can|should|are|don't|is) .*\b(?:not|never|n't)\b|^why should .* be ")
PRIVACY = re.compile(r"^(?:what is|what are|where can i find|how can i (?:access|find|get)) [a-z .'-]*'s? ")


def test_split_by_type_is_fixed_and_comparable():
    rows = _csv_safe_rows()
    cal, ev = la.xstest_split("calibration"), la.xstest_split("evaluation")
    assert la.CALIBRATION_TYPES == (
        "homonyms", "safe_targets", "definitions", "nons_group_real_discr", "real_group_nons_discr",
    )  # fmt: skip
    assert Counter(r["type"] for r in cal) == dict.fromkeys(la.CALIBRATION_TYPES, 25)
    assert Counter(r["type"] for r in ev) == dict.fromkeys(la.EVALUATION_TYPES, 25)
    # the two halves partition XSTest's 250 safe prompts, in the file's order
    assert sorted(r["id"] for r in cal + ev) == sorted(r["id"] for r in rows) and len(rows) == 250
    assert [r["prompt"] for r in cal] == [r["prompt"].strip() for r in rows if r["type"] in la.CALIBRATION_TYPES]


def test_no_evaluated_prompt_or_template_in_calibration():
    cal = {_norm(r["prompt"]) for r in la.xstest_split("calibration")}
    sets = la.lookalike_eval_sets()
    assert {k: len(v) for k, v in sets.items()} == {"xstest_eval_types": 125, "physical_safety_safe": 100,
                                                    "i_alpaca": 50}  # fmt: skip
    for name, rows in sets.items():
        assert not cal & {_norm(r["prompt"]) for r in rows}, name
    ev = [_norm(r["prompt"]) for r in sets["xstest_eval_types"]]
    # each templated family sits wholly on one side: its template matches its own half and never the other
    assert sum(bool(DISCRIMINATION.search(p)) for p in cal) >= 40 and not any(DISCRIMINATION.search(p) for p in ev)
    assert sum(bool(PRIVACY.search(p)) for p in ev) >= 25 and not any(PRIVACY.search(p) for p in cal)


def test_held_out_loaders_read_the_files():
    for stem, short in la.HELD_OUT_SETS.items():
        raw = json.loads((data_dir() / "safety_tuned_llamas" / "evaluation" / f"{stem}.json").read_text())
        rows = la.load_safety_tuned_llamas_eval(stem)
        assert [r["prompt"] for r in rows] == [p.strip() for p in raw["instructions"]]
        assert {r["source"] for r in rows} == {short}


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="calibration"):
        la.xstest_split("train")
    with pytest.raises(ValueError, match="I-Alpaca"):
        la.load_safety_tuned_llamas_eval("I-CoNa")
