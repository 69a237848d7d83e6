"""Writing outputs without losing anything: atomic files, atomic output folders, one sha256 helper.

An output folder is built beside its target under a temporary name (``.NAME.cast-tmp-<pid>-<random>-<host>``), a
marker file naming the command is written into it last, and it is swapped in: old → ``.NAME.cast-trash-...`` → new
renamed in → trash removed. A kill at any instant leaves the old or the new output whole: before the first rename
the target is untouched, after the second it is the new output. Between the two renames the target path is briefly
missing while the old output lies complete in the trash folder; the next write to that target restores it
(:func:`clean_stale`) before doing anything else. Temporary and trash folders of dead runs (pid gone on this host,
or older than ``STALE_HOURS`` when written from another host) are removed at the start of the next run, with a log
line. Everything is created with the permissions a plain ``open``/``mkdir`` gives (0666/0777 minus the umask).

A folder is only ever replaced when cast-peft wrote it (it holds the marker, or only the files of a known
``replaceable`` set, e.g. a map saved by an older version); never the working directory or one of its parents, a
folder holding an input of the command, or a non-empty folder someone else wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


logger = logging.getLogger(__name__)

MARKER_NAME = ".cast_peft_output.json"
STALE_HOURS = 24
# Test hook: a process whose environment names one of the stages below sleeps there, so a test can SIGKILL it at
# that exact point of a write (tests/test_outputs.py).
PAUSE_ENV = "CAST_PEFT_TEST_PAUSE_AT"
_KINDS = ("tmp", "trash")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pause_point(stage: str) -> None:
    """Sleep here when the environment asks for it (test-only; see ``PAUSE_ENV``)."""
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"cast-peft: paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(600)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- files
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 minus the umask).
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------- folders
def _host() -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname()) or "host"


def _temp_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.cast-{kind}-{os.getpid()}-{secrets.token_hex(4)}-{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the temporary/trash folders of dead runs beside ``target``, newest first."""
    prefix = f".{target.name}.cast-"
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    found = []
    for path in entries:
        try:
            kind, pid, _, host = path.name[len(prefix) :].split("-", 3)
            mtime = path.stat().st_mtime
            dead = (
                not _pid_alive(int(pid))
                if host == _host() and os.name != "nt"  # Windows: os.kill(pid, 0) would terminate the process
                else time.time() - mtime > STALE_HOURS * 3600
            )
        except (ValueError, OSError):
            continue
        if kind in _KINDS and dead:
            found.append((mtime, kind, path))
    return [(kind, path) for _, kind, path in sorted(found, reverse=True)]


def _remove(path: Path) -> bool:
    """Delete a folder cast-peft made, making read-only subfolders writable first; ``False`` if it could not."""

    def retry(func, failed, *_):
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:
            shutil.rmtree(path, onerror=retry)
    except OSError as err:
        logger.warning("cast-peft: could not remove %s (%s); remove it yourself.", path, err)
        return False
    return True


def clean_stale(target: str | os.PathLike) -> None:
    """Finish what interrupted runs left beside ``target``: restore an old output whose swap was cut between its two
    renames (target missing, complete trash folder present), and delete dead runs' temporary and trash folders."""
    target = Path(target).absolute()
    for kind, path in _leftovers(target):
        if kind == "trash" and not os.path.lexists(target):
            os.rename(path, target)
            logger.warning("cast-peft: restored %s from %s (a run was stopped while swapping it).", target, path.name)
        elif _remove(path):
            logger.warning("cast-peft: removed %s, left by an interrupted run.", path)


def check_output(
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    replaceable: Iterable[str] | None = None,
) -> Path:
    """Raise `OutputError` (with the reason and the fix) unless a folder may be written at ``target``.

    Refused: a file, or a path under a file; a parent folder that cannot be written; the working directory or one of
    its parents; a folder holding one of ``inputs``; an existing non-empty folder without ``overwrite``, or with it
    when cast-peft did not write it (no marker file, and not only names from ``replaceable``). An empty folder is
    used as if it did not exist. Returns the absolute target.
    """
    target = Path(target).absolute()
    real = target.resolve()
    ancestor = next(p for p in (real, *real.parents) if p.exists())
    if not ancestor.is_dir():
        where = "is a file" if ancestor == real else f"lies under the file {ancestor}"
        raise OutputError(f"{target} {where}; choose an output folder path that is not a file.")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(
            f"{target} is the working directory or one of its parents; replacing it would delete everything in it. "
            "Choose a new folder (e.g. --output runs/diag1)."
        )
    for item in inputs:
        if item is None or not os.path.lexists(item):
            continue
        path = Path(item).resolve()
        if path == real or real in path.parents:
            raise OutputError(
                f"{target} holds {item}, an input of this command; writing the output there would delete it. "
                "Choose another output folder."
            )
    writable_dir = ancestor.parent if ancestor == real else ancestor
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write in {writable_dir} (permission denied); choose an output folder you can write."
        )
    if real.is_dir():
        entries = {p.name for p in real.iterdir()}
        if entries:
            ours = MARKER_NAME in entries or (replaceable is not None and entries <= set(replaceable))
            if not overwrite:
                raise OutputError(
                    f"{target} already exists; pass --overwrite to replace it (only if cast-peft wrote it) or choose "
                    "another output folder."
                )
            if not ours:
                raise OutputError(
                    f"{target} is not empty and was not written by cast-peft (no {MARKER_NAME}), so it is not "
                    "replaced. Choose another output folder, or move its contents away yourself."
                )
            if not os.access(real, os.W_OK | os.X_OK):
                raise OutputError(
                    f"{target} is read-only, so it is not replaced; make it writable (chmod -R u+w) or choose another "
                    "output folder."
                )
    return target


def prepare_output(target: str | os.PathLike, **check: object) -> Path:
    """What a command does first: finish interrupted runs' leftovers beside ``target``, then :func:`check_output`."""
    clean_stale(target)
    return check_output(target, **check)  # type: ignore[arg-type]


@contextmanager
def output_folder(
    target: str | os.PathLike,
    *,
    command: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    replaceable: Iterable[str] | None = None,
) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` to write the output into; on success swap it in atomically (see the
    module docstring), on failure delete it. The checks of :func:`check_output` run before and again at the swap."""
    inputs, replaceable = list(inputs), None if replaceable is None else set(replaceable)
    check = dict(overwrite=overwrite, inputs=inputs, replaceable=replaceable)
    target = prepare_output(target, **check)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target, "tmp")
    os.mkdir(tmp)  # 0777 minus the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield tmp
        _default_modes(tmp)
        from . import __version__

        marker = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cast_peft": __version__}
        atomic_write_text(tmp / MARKER_NAME, json.dumps(marker, indent=2))
        pause_point("built")
        check_output(target, **check)  # type: ignore[arg-type]
        _swap_in(tmp, target)
    except BaseException:
        if tmp.exists():
            _remove(tmp)
        raise


def _default_modes(folder: Path) -> None:
    """Give everything in ``folder`` the modes a plain open()/mkdir() would: safetensors (0.8.0) creates its files
    0600, so a merged model or adapter would be unreadable to a server running as another user."""
    mask = umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _swap_in(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
        pause_point("swapped")
        return
    trash = _temp_path(target, "trash")
    os.rename(target, trash)
    pause_point("trashed")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(trash, target)
        raise
    pause_point("swapped")
    _remove(trash)
