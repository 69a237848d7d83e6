"""The trade-off report's paired seed comparison, against a paired t statistic computed here by hand."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tradeoff  # noqa: E402


BASE = {"summary": {"xstest_over_refusal": 0.05}}


def _runs(values: dict[int, float]) -> list[dict]:
    return [{"seed": seed, "summary": {"xstest_over_refusal": v}} for seed, v in values.items()]


def test_paired_comparison_uses_per_seed_gaps():
    cast = _runs({0: 0.80, 1: 0.70, 2: 0.60})
    other = _runs({0: 0.85, 1: 0.73, 2: 0.64})
    gaps = [0.05, 0.03, 0.04]
    mean = sum(gaps) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 2)
    beats, text = tradeoff.paired_comparison(BASE, cast, other, "xstest_over_refusal")
    assert beats  # t = 6.93 > 2.92 (one-sided 95%, 2 degrees of freedom)
    assert f"t = {mean / (sd / math.sqrt(3)):.2f}" in text and "lower on 3/3" in text
    # The unpaired means differ by less than the seed spread, which a paired test is not fooled by.
    spread = max(statistics.stdev([0.80, 0.70, 0.60]), statistics.stdev([0.85, 0.73, 0.64]))
    assert f"unpaired: gap +0.040 vs seed std {spread:.3f}" in text and spread > 2 * mean
    # A seed without a CAST run is not paired.
    assert (
        "paired over 3 seeds"
        in tradeoff.paired_comparison(BASE, cast, other + _runs({3: 0.99}), "xstest_over_refusal")[1]
    )


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ({0: 0.85, 1: 0.69, 2: 0.64}, "lower on 2/3"),  # one seed the other way: t = 1.03, not significant
        ({0: 0.80, 1: 0.70, 2: 0.60}, "t = 0.00"),  # identical costs
        ({0: 0.90}, "cannot tell with 1 paired seed"),
        ({0: 0.7 + 0.1, 1: 0.6 + 0.1, 2: 0.5 + 0.1}, "t = 0.00"),  # equal up to float rounding
    ],
)
def test_paired_comparison_refuses_weak_evidence(other, expected):
    beats, text = tradeoff.paired_comparison(
        BASE, _runs({0: 0.80, 1: 0.70, 2: 0.60}), _runs(other), "xstest_over_refusal"
    )
    assert not beats and expected in text


def _full_runs(xstest: dict[int, float]) -> list[dict]:
    summary = {"harmful_refusal": 1.0, "helpful_nll": 2.7, "kl_drift": 0.3}
    return [{"seed": seed, "summary": {**summary, "xstest_over_refusal": v}} for seed, v in xstest.items()]


def test_verdict_compares_cast_with_each_control_at_its_budget():
    base = {"summary": {"harmful_refusal": 0.0, "xstest_over_refusal": 0.05, "helpful_nll": 2.6, "kl_drift": 0.0}}
    by_method = {
        "lora": _full_runs({0: 0.90, 1: 0.80, 2: 0.80}),
        "cast-10": _full_runs({0: 0.80, 1: 0.70, 2: 0.60}),
        "random-10": _full_runs({0: 0.85, 1: 0.73, 2: 0.64}),
        "oc-10": _full_runs({0: 0.80, 1: 0.70, 2: 0.60}),
        "fs-20": _full_runs({0: 0.99, 1: 0.99, 2: 0.99}),  # another budget: not a control of cast-10
    }
    (line,) = tradeoff.verdict(base, by_method, "safety")
    assert "below random: yes, paired over 3 seeds" in line and "below oc-10: no, paired over 3 seeds" in line
    assert "fs-" not in line and "pcgrad" not in line
    # Matched safety and beating random is not enough: the cost is 0.65 / 0.78 of LoRA's, not <= 0.5.
    assert "does NOT hold" in line and "≤ 50% of LoRA's loss: False" in line
    cheap = {**by_method, "cast-10": _full_runs({0: 0.30, 1: 0.30, 2: 0.25})}
    assert (
        "**Claim on the primary utility metric (XSTest over-refusal): HOLDS**"
        in tradeoff.verdict(base, cheap, "safety")[0]
    )
