"""ConflictMap: scores derived from stored gradient statistics, selection, save/load, plotting, compatibility."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import build_tiny_model

from cast_peft import CASTLoraConfig, CastWarning
from cast_peft.conflict_map import (
    ConflictMap,
    ConflictMapError,
    combine_scores,
    normalize,
    rank01,
    spearman,
)
from cast_peft.conflict_map.storage import META_FILE, TENSORS_FILE
from cast_peft.geometry import AttentionGeometry, HeadCounts


COUNTS = HeadCounts("llama", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


def _vectors(seed: int = 0):
    """Random safety/utility gradient pieces per role and unit, and the map's stats computed from them."""
    generator = torch.Generator().manual_seed(seed)
    geometry = AttentionGeometry(COUNTS)
    pieces, stats = {}, {}
    for role in ("q", "k", "v", "o"):
        shape = (COUNTS.num_layers, geometry.units(role), 5)
        s = torch.randn(*shape, generator=generator, dtype=torch.float64)
        u = torch.randn(*shape, generator=generator, dtype=torch.float64) + 0.5 * s  # some agreement
        pieces[role] = (s, u)
        stats[role] = torch.stack([(s * s).sum(-1), (u * u).sum(-1), (s * u).sum(-1)], -1)
    fs = torch.randn(COUNTS.num_layers, COUNTS.num_heads, generator=generator).double()
    return pieces, stats, fs


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_oc_is_one_minus_cosine_over_the_head_parameters():
    pieces, stats, fs = _vectors()
    shared = ConflictMap(COUNTS, stats, fs, kv_scoring="shared")
    separate = shared.rescore(kv_scoring="separate")
    for layer in range(COUNTS.num_layers):
        for head in range(COUNTS.num_heads):
            kv = head // COUNTS.group_size
            parts = [("q", head), ("o", head), ("k", kv), ("v", kv)]
            s = torch.cat([pieces[r][0][layer, unit] for r, unit in parts])
            u = torch.cat([pieces[r][1][layer, unit] for r, unit in parts])
            assert float(shared.oc[layer, head]) == pytest.approx(1 - _cos(s, u), abs=1e-12)
            s, u = (torch.cat([pieces[r][i][layer, head] for r in ("q", "o")]) for i in (0, 1))
            assert float(separate.oc[layer, head]) == pytest.approx(1 - _cos(s, u), abs=1e-12)
        for kv in range(COUNTS.num_kv_heads):
            s, u = (torch.cat([pieces[r][i][layer, kv] for r in ("k", "v")]) for i in (0, 1))
            assert float(separate.oc_kv[layer, kv]) == pytest.approx(1 - _cos(s, u), abs=1e-12)
    torch.testing.assert_close(shared.fs, fs.abs())
    torch.testing.assert_close(separate.fs_kv, fs.view(3, 2, 2).sum(-1).abs())  # a KV group's Taylor FS is additive
    assert shared.oc_kv is None and shared.score_kv is None


def test_zero_gradient_counts_as_orthogonal_and_nan_is_refused():
    _, stats, fs = _vectors()
    stats["q"][0, 1] = stats["o"][0, 1] = 0
    separate = ConflictMap(COUNTS, stats, fs, kv_scoring="separate")
    assert float(separate.oc[0, 1]) == 1.0
    stats["k"][1, 0, 2] = float("nan")
    with pytest.raises(ConflictMapError, match="stats_k|k has NaN|NaN"):
        ConflictMap(COUNTS, stats, fs)
    with pytest.raises(ConflictMapError, match="shape"):
        ConflictMap(COUNTS, {**stats, "q": stats["q"][:2]}, fs)


def test_normalisation_and_combination():
    torch.testing.assert_close(
        rank01(torch.tensor([3.0, 1.0, 2.0, 2.0])), torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(rank01(torch.ones(3)), torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(
        normalize(torch.tensor([1.0, 3.0, 2.0]), "minmax"), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(normalize(torch.ones(2), "minmax"), torch.ones(2, dtype=torch.float64))
    oc, fs = torch.tensor([0.5, 1.5, 1.0]), torch.tensor([2.0, 1.0, 3.0])
    torch.testing.assert_close(
        combine_scores(oc, fs, "product", "rank"), torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        combine_scores(oc, fs, "sum", "rank"), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    )
    torch.testing.assert_close(combine_scores(oc, fs, "oc", "minmax"), normalize(oc, "minmax"))
    with pytest.raises(ValueError, match="combine='max'"):
        combine_scores(oc, fs, "max", "rank")
    assert spearman(oc, oc) == pytest.approx(1.0) and spearman(oc, -oc) == pytest.approx(-1.0)


def test_select_budgets_policies_and_ties():
    _, stats, fs = _vectors()
    cmap = ConflictMap(COUNTS, stats, fs)
    flat_order = torch.sort(-cmap.score.reshape(-1), stable=True).indices.tolist()

    def as_set(selection):
        return {layer * 4 + h for layer, heads in selection.items() for h in heads}

    assert as_set(cmap.select(skip_k=3)) == set(flat_order[:3])
    assert as_set(cmap.select(skip_ratio=0.25)) == set(flat_order[:3])  # 0.25 * 12 heads
    assert len(as_set(cmap.select())) == 1  # default ratio 0.1 of 12, rounded
    threshold = float(cmap.score.reshape(-1)[flat_order[4]])
    assert as_set(cmap.select(threshold=threshold)) == set(flat_order[:5])
    for policy, metric in (("oc", cmap.oc), ("fs", cmap.fs)):
        top = set(torch.sort(-metric.reshape(-1), stable=True).indices[:5].tolist())
        assert as_set(cmap.select(threshold=threshold, policy=policy)) == top  # budget taken from the score
    random_a = cmap.select(skip_k=5, policy="random", seed=1)
    assert len(as_set(random_a)) == 5 and random_a == cmap.select(skip_k=5, policy="random", seed=1)
    assert any(cmap.select(skip_k=5, policy="random", seed=s) != random_a for s in range(2, 6))
    assert all(heads == sorted(heads) for heads in cmap.select(skip_k=6).values())
    tied = ConflictMap(COUNTS, stats, torch.ones(3, 4, dtype=torch.float64), combine="fs")
    assert tied.select(skip_k=2) == {0: [0, 1]}  # ties go to the lowest (layer, head)
    assert cmap.select(skip_k=0) == {}


def test_select_refuses_impossible_budgets():
    _, stats, fs = _vectors()
    cmap = ConflictMap(COUNTS, stats, fs)
    with pytest.raises(ValueError, match="Give one budget"):
        cmap.select(skip_ratio=0.1, skip_k=2)
    with pytest.raises(ValueError, match="must be in"):
        cmap.select(skip_ratio=1.0)
    with pytest.raises(ValueError, match="fewer than all"):
        cmap.select(skip_k=12)
    with pytest.raises(ValueError, match="policy='best'"):
        cmap.select(skip_k=1, policy="best")
    with pytest.raises(ValueError, match="kv_scoring='separate'"):
        cmap.rescore(kv_scoring="shared").select_kv(skip_k=1)
    kv = cmap.select_kv(skip_k=2)
    assert sum(len(v) for v in kv.values()) == 2 and all(h < 2 for v in kv.values() for h in v)


def test_save_load_roundtrip(tmp_path):
    _, stats, fs = _vectors()
    cmap = ConflictMap(
        COUNTS,
        stats,
        fs,
        kv_scoring="shared",
        combine="sum",
        normalization="rank",
        metadata={"seed": 3, "data": {"safety": {"sha256": "ab"}}},
        extras={"taylor_signed": fs * 2},
    )
    cmap.save(tmp_path / "map")
    cmap.save(tmp_path / "map")  # overwriting is fine
    loaded = ConflictMap.load(tmp_path / "map")
    for name, tensor in cmap.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[name]), name
    assert (loaded.kv_scoring, loaded.combine, loaded.normalization) == ("shared", "sum", "rank")
    assert loaded.metadata == cmap.metadata and loaded.counts == COUNTS
    assert loaded.select(skip_k=4) == cmap.select(skip_k=4)
    assert not list((tmp_path / "map").glob(".*tmp"))  # no temporary files left behind


def test_load_refuses_missing_partial_corrupt_and_foreign_files(tmp_path):
    _, stats, fs = _vectors()
    folder = ConflictMap(COUNTS, stats, fs).save(tmp_path / "map")
    meta_text = (folder / META_FILE).read_text()
    tensor_bytes = (folder / TENSORS_FILE).read_bytes()

    def expect(match):
        with pytest.raises(ConflictMapError, match=match):
            ConflictMap.load(folder)

    with pytest.raises(ConflictMapError, match="is not a folder"):
        ConflictMap.load(tmp_path / "nowhere")
    (folder / META_FILE).unlink()
    expect("save was interrupted")
    (folder / META_FILE).write_text(meta_text[: len(meta_text) // 2])
    expect("not valid JSON")
    (folder / META_FILE).write_text(json.dumps({"format": "something-else"}))
    expect("not a cast-peft conflict map")
    (folder / META_FILE).write_text(json.dumps({**json.loads(meta_text), "format_version": 99}))
    expect("newer cast-peft")
    (folder / META_FILE).write_text(meta_text)
    (folder / TENSORS_FILE).write_bytes(tensor_bytes[:-10])
    expect("checksum differs")
    (folder / TENSORS_FILE).unlink()
    expect("lacks conflict_map.safetensors")
    garbage = b"not a safetensors file"
    (folder / TENSORS_FILE).write_bytes(garbage)
    import hashlib

    meta = json.loads(meta_text)
    meta["tensors_sha256"] = hashlib.sha256(garbage).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))
    expect("unreadable conflict map")
    (folder / TENSORS_FILE).write_bytes(tensor_bytes)
    (folder / META_FILE).write_text(
        json.dumps({**json.loads(meta_text), "counts": {**meta["counts"], "num_heads": 8}})
    )
    expect("shape")


def test_plot_marks_the_skip_set(tmp_path):
    _, stats, fs = _vectors()
    cmap = ConflictMap(COUNTS, stats, fs, metadata={"model": {"name_or_path": "tiny"}})
    png = cmap.plot(tmp_path / "map.png", skip_ratio=0.25)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = cmap.plot(tmp_path / "sub" / "map.pdf", skip={0: [1]})
    assert pdf.read_bytes()[:5] == b"%PDF-"
    cmap.plot(tmp_path / "none.png", skip_ratio=None)


def test_check_compatible_and_config_from_map():
    model = build_tiny_model("llama")
    counts = AttentionGeometry.from_model(model).counts
    generator = torch.Generator().manual_seed(0)
    stats = {
        role: torch.rand(
            counts.num_layers, counts.num_kv_heads if role in "kv" else counts.num_heads, 3, generator=generator
        ).double()
        for role in "qkvo"
    }
    cmap = ConflictMap(counts, stats, torch.rand(counts.num_layers, counts.num_heads, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmap.check_compatible(model)
    other = ConflictMap(COUNTS, *_vectors()[1:])
    with pytest.raises(ConflictMapError, match="Diagnose this model"):
        other.check_compatible(model)
    cmap.metadata["model"] = {"config_sha256": "0" * 16}
    with pytest.warns(CastWarning, match="config differs"):
        cmap.check_compatible(model)
    config = CASTLoraConfig.from_conflict_map(cmap, skip_k=3, r=4)
    assert config.skip_heads == cmap.select(skip_k=3)
    assert config.attention_geometry == counts.to_dict()
    assert config.skip_kv_heads is None  # KV heads follow kv_head_policy
    separate = cmap.rescore(kv_scoring="separate")
    config = CASTLoraConfig.from_conflict_map(separate, skip_k=3, kv_skip_ratio=0.5, r=4)
    assert config.skip_kv_heads == separate.select_kv(skip_ratio=0.5)
    assert sum(map(len, config.skip_kv_heads.values())) == 2  # half of 2 layers x 2 KV heads


def test_stability_of_a_map_with_itself_and_a_reversed_one():
    _, stats, fs = _vectors()
    cmap = ConflictMap(COUNTS, stats, fs, combine="fs")
    same = cmap.stability(cmap, skip_ratio=0.25)
    assert same == {
        "spearman_oc": pytest.approx(1.0),
        "spearman_fs": pytest.approx(1.0),
        "spearman_score": pytest.approx(1.0),
        "overlap": 1.0,
    }
    reversed_fs = ConflictMap(COUNTS, stats, 1 / fs.abs(), combine="fs")
    result = cmap.stability(reversed_fs, skip_ratio=0.25)
    assert result["spearman_fs"] == pytest.approx(-1.0) and result["overlap"] == 0.0
