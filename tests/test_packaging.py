"""What ships in the wheel: library code only, no benchmark data paths, no repository paths, pip only in the CLI.

The last test builds the wheel, installs it into a fresh virtual environment outside the checkout and runs
``diagnose`` there, so a module that only works beside the repository fails here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cast_peft"
# Folders of this repository (and of the workspace beside it) that an installed package cannot know about.
REPOSITORY_PATHS = ("tests/", "benchmarks/", "notes/", "shared/data", "../shared", "notebooks/")


def _sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def _non_docstring_strings(tree: ast.Module) -> list[tuple[int, str]]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_runtime_string_names_a_repository_path():
    found = [
        f"{name}:{line}: {text[:80]!r}"
        for name, tree in _sources().items()
        for line, text in _non_docstring_strings(tree)
        if any(path in text for path in REPOSITORY_PATHS)
    ]
    assert not found, "strings that point an installed user into our repository:\n" + "\n".join(found)


def test_no_module_reads_the_benchmark_data():
    text = {name: (PACKAGE / name).read_text(encoding="utf-8") for name in _sources()}
    found = [name for name, body in text.items() if "CAST_DATA_DIR" in body or '"shared" / "data"' in body]
    assert not found, f"benchmark-data lookups belong in benchmarks/, not the package: {found}"


def test_only_the_cli_runs_subprocesses():
    found = []
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "subprocess" for n in names) and not name.startswith("cli/"):
                found.append(f"{name}:{node.lineno}")
    assert not found, f"only the CLI's embedded-default path may run pip: {found}"


@pytest.mark.slow
def test_the_installed_wheel_diagnoses_without_the_repository(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("cast_peft-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies (torch, transformers, peft, ...) come from the test environment's site-packages, added as a
    # plain path: its .pth files (among them the editable install of this checkout) are not processed there.
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    Path(site, "deps.pth").write_text(here + "\n")
    # Neither pip nor the script may see this checkout: a PYTHONPATH to its src/ makes pip take cast-peft as installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAST_DATA_DIR")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   env=env)  # fmt: skip
    script = textwrap.dedent(
        """
        import sys, torch, cast_peft
        from pathlib import Path
        from transformers import LlamaConfig, LlamaForCausalLM

        assert "site-packages" in cast_peft.__file__, cast_peft.__file__
        assert not any("cast_peft" in p or p.endswith("/src") for p in sys.path if p), sys.path
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, 64, (2, 8))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        cmap = cast_peft.diagnose(model, None, [batch], [batch], progress=False)
        cmap.save(Path("map"))
        assert cast_peft.ConflictMap.load(Path("map")).score.shape == (2, 4)
        print("ok", cmap)
        """
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run(
        [str(python), "-c", script], cwd=run_dir, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
