"""The trade-off study's budget-matched confound controls (issue 16): ``random-depth-P`` skips as many heads per layer as
the CAST-P set, ``random-kv-P`` freezes as many KV heads; both checked against counts made here by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _tradeoff_lib as lib  # noqa: E402

from cast_peft.conflict_map import ConflictMap  # noqa: E402
from cast_peft.geometry import AttentionGeometry, HeadCounts  # noqa: E402


#: The committed LoRA study's map of SmolLM2-135M-Instruct (30 layers x 9 heads, 3 KV heads): the study's own input.
STUDY_MAP = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tradeoff" / "reduced" / "map"


def _random_map(counts: HeadCounts, seed: int) -> ConflictMap:
    generator = torch.Generator().manual_seed(seed)
    geometry = AttentionGeometry(counts)
    stats = {}
    for role in ("q", "k", "v", "o"):
        s = torch.randn(counts.num_layers, geometry.units(role), 5, generator=generator, dtype=torch.float64)
        u = torch.randn(counts.num_layers, geometry.units(role), 5, generator=generator, dtype=torch.float64)
        stats[role] = torch.stack([(s * s).sum(-1), (u * u).sum(-1), (s * u).sum(-1)], -1)
    return ConflictMap(counts, stats, torch.randn(counts.num_layers, counts.num_heads, generator=generator).double())


def _per_layer(skip: dict[int, list[int]]) -> dict[int, int]:
    return {layer: len(heads) for layer, heads in skip.items() if heads}


def _frozen_kv_by_hand(skip: dict[int, list[int]], num_kv_heads: int, group_size: int) -> int:
    """KV heads whose whole query group is skipped (the default kv_head_policy "all"), counted directly."""
    return sum(
        all(h in skip.get(layer, []) for h in range(kv * group_size, (kv + 1) * group_size))
        for layer in skip
        for kv in range(num_kv_heads)
    )


def _as_set(skip: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(layer, h) for layer, heads in skip.items() for h in heads}


def _check_valid(skip: dict[int, list[int]], counts: HeadCounts) -> None:
    for layer, heads in skip.items():
        assert 0 <= layer < counts.num_layers and heads == sorted(set(heads)) and heads
        assert all(0 <= h < counts.num_heads for h in heads)


MAPS = {
    "smollm2-study-map": lambda: ConflictMap.load(STUDY_MAP),
    "gqa": lambda: _random_map(HeadCounts("llama", num_layers=6, num_heads=8, num_kv_heads=2, head_dim=4), 0),
    "gqa-pairs": lambda: _random_map(HeadCounts("llama", num_layers=5, num_heads=6, num_kv_heads=3, head_dim=4), 1),
}


@pytest.mark.parametrize("map_name", sorted(MAPS))
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4])
def test_random_depth_and_random_kv_match_the_cast_set(map_name: str, ratio: float) -> None:
    cmap = MAPS[map_name]()
    counts, g = cmap.counts, cmap.counts.group_size
    n_total = counts.num_layers * counts.num_heads
    cast = cmap.select(skip_ratio=ratio)
    n_cast = sum(len(h) for h in cast.values())
    assert n_cast == round(ratio * n_total)
    kv_cast = _frozen_kv_by_hand(cast, counts.num_kv_heads, g)
    for seed in (0, 1, 2):
        depth = lib.select_skip(cmap, "random-depth", ratio, seed)
        kv = lib.select_skip(cmap, "random-kv", ratio, seed)
        for skip in (depth, kv):
            _check_valid(skip, counts)
            assert sum(len(h) for h in skip.values()) == n_cast
            assert _as_set(skip) != _as_set(cast)
        assert _per_layer(depth) == {layer: len(h) for layer, h in cast.items()}
        assert _frozen_kv_by_hand(kv, counts.num_kv_heads, g) == kv_cast
        # The library's own count (what the run JSON records) agrees with the hand count.
        assert lib.skip_profile(kv, counts)["frozen_kv_heads"] == kv_cast
        assert lib.skip_profile(depth, counts)["heads_per_layer"] == {str(k): len(v) for k, v in sorted(cast.items())}
        # Seeded: the same draw again.
        assert lib.select_skip(cmap, "random-kv", ratio, seed) == kv
        assert lib.select_skip(cmap, "random-depth", ratio, seed) == depth
    # Seeded by the run seed: other seeds draw other sets.
    assert len({frozenset(_as_set(lib.select_skip(cmap, "random-kv", ratio, s))) for s in range(4)}) > 1
    assert len({frozenset(_as_set(lib.select_skip(cmap, "random-depth", ratio, s))) for s in range(4)}) > 1


def test_the_study_map_has_the_confounds_the_controls_remove() -> None:
    """On the study's own map the CAST sets freeze whole KV groups (the issue's 2 and 5) and sit early; a plain random
    draw of the same size freezes fewer groups, random-kv exactly as many, and random-depth keeps CAST's depth."""
    cmap = ConflictMap.load(STUDY_MAP)
    counts = cmap.counts
    for ratio, groups in ((0.1, 2), (0.2, 5)):
        cast = cmap.select(skip_ratio=ratio)
        assert _frozen_kv_by_hand(cast, counts.num_kv_heads, counts.group_size) == groups
        mean_layer = sum(layer * len(h) for layer, h in cast.items()) / sum(len(h) for h in cast.values())
        for seed in (0, 1, 2):
            plain = cmap.select(skip_ratio=ratio, policy="random", seed=seed)
            kv = lib.select_skip(cmap, "random-kv", ratio, seed)
            depth = lib.select_skip(cmap, "random-depth", ratio, seed)
            assert _frozen_kv_by_hand(plain, counts.num_kv_heads, counts.group_size) < groups
            assert _frozen_kv_by_hand(kv, counts.num_kv_heads, counts.group_size) == groups
            depth_mean = sum(layer * len(h) for layer, h in depth.items()) / sum(len(h) for h in depth.values())
            assert depth_mean == pytest.approx(mean_layer)


@pytest.mark.parametrize(("num_kv_heads", "ratio"), [(8, 0.25), (1, 0.5)])
def test_random_kv_with_multi_head_and_multi_query_attention(num_kv_heads: int, ratio: float) -> None:
    """MHA: every skipped head freezes its own KV head, so random-kv freezes all N. MQA: a KV head is a whole layer."""
    counts = HeadCounts("llama", num_layers=4, num_heads=8, num_kv_heads=num_kv_heads, head_dim=4)
    cmap = _random_map(counts, 2)
    cast = cmap.select(skip_ratio=ratio)
    kv = lib.select_skip(cmap, "random-kv", ratio, 0)
    assert sum(map(len, kv.values())) == sum(map(len, cast.values()))
    assert _frozen_kv_by_hand(kv, num_kv_heads, counts.group_size) == _frozen_kv_by_hand(
        cast, num_kv_heads, counts.group_size
    )


def test_method_names_and_modes() -> None:
    assert lib.parse_method("random-depth-10") == ("random-depth", 0.1)
    assert lib.parse_method("random-kv-20") == ("random-kv", 0.2)
    assert lib.parse_method("random-20") == ("random", 0.2)
    assert lib.parse_method("full") == ("full", None)
    for bad in ("random-depth", "random-kv-x", "full-10", "depth-10"):
        with pytest.raises(ValueError, match="Unknown method"):
            lib.parse_method(bad)
    with pytest.raises(ValueError, match="--mode full"):
        lib.check_method("full", "lora")
    for lora_only in ("lora", "pcgrad", "pilot-10"):
        with pytest.raises(ValueError, match="needs a LoRA adapter"):
            lib.check_method(lora_only, "full")
    lib.check_method("random-kv-10", "lora")  # the LoRA study uses the controls too
    assert lib.default_methods([0.1, 0.2], "full") == [
        "base", "full", "cast-10", "cast-20", "random-10", "random-20", "fs-20", "random-depth-20", "random-kv-20"
    ]  # fmt: skip
    # The committed LoRA study's plan is unchanged.
    assert lib.default_methods([0.05, 0.1, 0.2, 0.4]) == [
        "base", "lora", "cast-5", "cast-10", "cast-20", "cast-40", "random-5", "random-10", "random-20", "random-40",
        "oc-10", "fs-10", "pcgrad", "pilot-10",
    ]  # fmt: skip


def test_calibration_rule_is_the_smallest_lr_reaching_the_target() -> None:
    refusal = {1e-5: {"safety": 0.55}, 3e-5: {"safety": 0.92}, 1e-4: {"safety": 1.0}}
    assert lib.pick_learning_rate(refusal, 0.9) == 3e-5
    assert lib.pick_learning_rate(refusal, 1.0) == 1e-4
    assert lib.pick_learning_rate(refusal, 0.0) == 1e-5
    assert lib.pick_learning_rate({1e-5: {"safety": 0.5}}, 0.9) is None
    # Every calibrated regime must reach it.
    assert (
        lib.pick_learning_rate({1e-5: {"safety": 0.95, "mixed": 0.6}, 1e-4: {"safety": 1.0, "mixed": 0.9}}, 0.9)
        == 1e-4
    )


def test_lora_fingerprint_is_unchanged_and_full_mode_has_its_own() -> None:
    """The committed LoRA study's folder stays valid; a full-mode folder never matches a LoRA one."""
    import json

    pinned = json.loads((STUDY_MAP.parent / "settings.json").read_text())
    settings = {**lib.PROFILES["reduced"], "model": "smollm2-135m-instruct", "mode": "lora"}
    assert lib.fingerprint(settings) == pinned["fingerprint"]
    full = {**settings, "mode": "full", "learning_rate": None}
    assert lib.fingerprint(full) != pinned["fingerprint"]
    assert "learning_rate" not in lib.fingerprint_keys(full) and "mode" in lib.fingerprint_keys(full)
    assert lib.fingerprint(full) != lib.fingerprint({**full, "mode": "full-mlp"})
