"""The shared-data loaders of the benchmarks (``benchmarks/shared_data.py``), on the real files where present."""

from pathlib import Path

import pytest
import shared_data


REPO = Path(__file__).resolve().parents[2]


def test_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_DATA_DIR", str(tmp_path))
    assert shared_data.data_dir() == tmp_path.resolve()
    monkeypatch.setenv("CAST_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CAST_DATA_DIR"):
        shared_data.data_dir()


def test_data_dir_defaults_to_the_folder_beside_the_repository(monkeypatch):
    monkeypatch.delenv("CAST_DATA_DIR", raising=False)
    expected = (REPO.parent / "shared" / "data").resolve()
    if not expected.is_dir():
        with pytest.raises(FileNotFoundError, match="CAST_DATA_DIR"):
            shared_data.data_dir()
    else:
        assert shared_data.data_dir() == expected


def test_the_library_has_no_benchmark_loaders():
    import cast_peft.data
    import cast_peft.evaluation

    names = ["data_dir", "load_advbench", "load_harmbench", "load_xstest", "load_safety_tuned_llamas_train",
             "load_alpaca_libre", "load_self_instruct_user_oriented"]  # fmt: skip
    assert not [name for name in names if hasattr(cast_peft.data, name)]
    assert not hasattr(cast_peft.evaluation, "load_mc_items")


@pytest.fixture(scope="module")
def data_folder():
    try:
        return shared_data.data_dir()
    except FileNotFoundError:
        pytest.skip("shared benchmark data not available")


@pytest.mark.parametrize(
    "loader, kwargs, count",
    [
        ("load_advbench", {}, 520),
        ("load_harmbench", {"split": "test"}, 159),
        ("load_harmbench", {"split": "val"}, 41),
        ("load_harmbench", {"split": "all"}, 200),
        ("load_xstest", {"label": "safe"}, 250),
        ("load_xstest", {"label": "unsafe"}, 200),
        ("load_safety_tuned_llamas_train", {}, 2483),
        ("load_alpaca_libre", {}, 3097),
        ("load_alpaca_libre", {"limit": 25}, 25),
        ("load_self_instruct_user_oriented", {}, 252),
    ],
)
def test_shared_loaders_row_counts(data_folder, loader, kwargs, count):
    rows = getattr(shared_data, loader)(**kwargs)
    assert len(rows) == count
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)
    has_response = loader in (
        "load_safety_tuned_llamas_train",
        "load_alpaca_libre",
        "load_self_instruct_user_oriented",
    )
    assert all(bool(r.get("response", "").strip()) == has_response for r in rows)


@pytest.mark.parametrize(
    "name,n_choices", [("arc_easy", 4), ("piqa", 2), ("hellaswag", 4), ("boolq", 2), ("winogrande", 2)]
)
def test_load_mc_items(data_folder, name, n_choices):
    items = shared_data.load_mc_items(name, limit=5)
    assert len(items) == 5
    for it in items:
        opts = it["contexts"] if name == "winogrande" else it["choices"]
        assert len(opts) == n_choices and 0 <= it["gold"] < n_choices
    if name == "hellaswag":
        assert items[0]["gold"] == 3 and items[0]["choices"][3] == " starts pulling up roofing on a roof."
    if name == "boolq":
        assert items[0]["choices"] == [" no", " yes"] and items[0]["context"].endswith("\nAnswer:")
    if name == "winogrande":
        assert items[0]["continuation"] == " always got the easier cases." and items[0]["gold"] == 1
    with pytest.raises(ValueError, match="unknown benchmark"):
        shared_data.load_mc_items("mmlu")
