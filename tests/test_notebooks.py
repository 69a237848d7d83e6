"""The tutorial notebooks run top to bottom in tiny mode and show their checks; the committed files carry no outputs.

Tiny mode (``CAST_NOTEBOOK_MODE=tiny``) builds a random tiny Llama and a toy tokenizer inside each notebook, so this
needs no model download; each notebook takes about 20-30 s on two CPU cores. The notebooks assert their own invariants
(frozen heads, merged == unmerged, ...); here we also look for the lines that report them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Lines each notebook must print when it runs in tiny mode.
EXPECTED = {
    "01_quickstart.ipynb": [
        "mode: tiny",
        "frozen heads verified: {'checked_factors'",
        "vanilla peft reproduces the CAST model: True",
        "merged == unmerged: True",
        "skipped heads bit-identical after merge: True",
    ],
    "02_qlora_single_gpu.ipynb": [
        "installed: cast-peft and bitsandbytes were there already",  # the install cell ran no pip
        "mode: tiny",
        "placement: device cpu, dtype float32, device_map None",
        "| model | batch x seq | exact, whole batches | sketch, whole batches | sketch, one row per pass |",
        "diagnosis memory plan (8 x 128 tokens per batch): accumulation=",
        "q_proj: bitsandbytes.nn.modules.Linear4bit",
        "CastLinear4bit wraps Linear4bit",
        "frozen heads verified: {'checked_factors'",
        "peak GPU memory",
        "merged == unmerged: True",
        "NF4 map vs torch.float32 map:",
        "skipped heads bit-identical after merge: True",
        "NF4 merge, layer",
    ],
    "03_conflict_map_anatomy.ipynb": [
        "mode: tiny",
        "| policy | heads | overlap with CAST (score) |",
    ],
}


def _outputs(nb) -> tuple[str, int]:
    """All text a notebook showed (streams, plain/markdown results) and the number of images."""
    texts, images = [], 0
    for cell in nb.cells:
        # per stream, the cell's pieces joined as they came: the kernel flushes on a timer, so one printed line can
        # arrive split over two outputs (and stderr in between)
        streams = {"stdout": "", "stderr": ""}
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                streams[out.name] += out.text
            data = out.get("data", {})
            texts += [data[kind] for kind in ("text/plain", "text/markdown") if kind in data]
            images += "image/png" in data
        texts += streams.values()
    return "\n".join(texts), images


def test_all_notebooks_are_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_is_stripped(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    mode_cell = code[1] if code and "pip" in code[0].source else code[0]  # an install cell may come first
    assert "CAST_NOTEBOOK_MODE" in mode_cell.source, "the first code cell (after an install cell) selects the mode"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_tiny_mode(name, monkeypatch, tmp_path):
    if name.startswith("02"):
        pytest.importorskip("bitsandbytes", reason="notebook 02 needs the `bnb` extra")
    # The kernel inherits this environment: tiny mode, one thread (tiny matrices; the CPU may be shared), and its
    # temporary folders under pytest's tmp_path.
    monkeypatch.setenv("CAST_NOTEBOOK_MODE", "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    text, images = _outputs(nb)
    missing = [line for line in EXPECTED[name] if line not in text]
    assert not missing, f"{name} did not print {missing}"
    assert images >= 1, f"{name} showed no plot"
    if name.startswith("03"):
        assert "trade-off results are not there yet" in text or "Trade-off results from" in text
