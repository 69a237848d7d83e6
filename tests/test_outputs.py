"""Outputs are written all-or-nothing and nothing the user wrote is deleted (issue 12, items 1-4, 12-13).

The kill tests run real subprocesses that pause at a named stage of a write (env ``CAST_PEFT_TEST_PAUSE_AT``), SIGKILL
them there, and check the bytes on disk: the target holds the complete old or new output (or, between the swap's two
renames, the old one lies complete in the trash folder and the next run puts it back), and a rerun works.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest
import torch
from _save_helpers import make_map, save_adapter
from models import build_tiny_model, build_tiny_tokenizer

import cast_peft
from cast_peft import AdapterError, CASTLoraConfig, ConflictMap, OutputError
from cast_peft._core.io import MARKER_NAME, PAUSE_ENV, clean_stale
from cast_peft.cli import main


TESTS = Path(__file__).parent
SRC = Path(cast_peft.__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def _leftovers(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.cast-*"))


def _same_map(a: ConflictMap, b: ConflictMap) -> bool:
    return all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())


def _start(args: list[str], stage: str) -> subprocess.Popen:
    env = {
        **os.environ,
        PAUSE_ENV: stage,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
    }
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _watchdog(proc.kill)
    return proc


def _watchdog(kill) -> threading.Timer:
    """Kill after 240 s, so a worker that never pauses cannot hang the suite; a daemon thread, so a pending timer
    does not keep pytest from exiting when the tests are done."""
    timer = threading.Timer(240, kill)
    timer.daemon = True
    timer.start()
    return timer


class _Forked:
    """A child forked from this test process (so it pays no import time) that calls ``fn(*args)`` with
    ``PAUSE_ENV=stage``; its stderr is a pipe, and ``kill`` is a real SIGKILL. CPU-only work (CUDA does not survive a
    fork): the CLI child below is a fresh interpreter instead."""

    def __init__(self, stage: str, fn, *args) -> None:
        read, write = os.pipe()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(read)
                sys.stderr = os.fdopen(write, "w", buffering=1)
                os.environ[PAUSE_ENV] = stage
                fn(*args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        self.stderr = os.fdopen(read)
        self._timer = _watchdog(self.kill)

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitpid(self.pid, 0)[1]
            self._timer.cancel()
        return self.returncode


def _kill_when_paused(proc: subprocess.Popen, stage: str) -> None:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"paused at {stage}" in line:
            proc.kill()
            proc.wait()
            return
    proc.wait()
    raise AssertionError(f"the worker never paused at {stage!r} (rc {proc.returncode}):\n{''.join(seen)[-3000:]}")


# ----------------------------------------------------------------------------------------------------- kills
def test_kill_at_every_stage_of_a_write_leaves_old_or_new_whole(tmp_path, tiny_dir, caplog):
    """Item 1 (swap), item 3 (map and adapter re-saves), item 4 (leftovers cleaned with a log line)."""
    old, new = make_map(0), make_map(1)
    # The stage between the swap's two renames ("trashed") is exercised through the CLI below: same swap function.
    maps = {stage: tmp_path / stage / "map" for stage in ("map-between-files", "swapped")}
    for target in maps.values():
        old.save(target)
    adapter = tmp_path / "adapter"
    save_adapter(str(adapter), 0, {0: [0]})
    old_adapter = {p.name: p.read_bytes() for p in adapter.iterdir()}
    cli_out = tmp_path / "cli" / "diag"
    common = ["--model", str(tiny_dir), "--n-calibration", "2", "--max-length", "32", "--batch-size", "2"]
    assert main(["diagnose", *common, "--output", str(cli_out)]) == 0
    cli_old = {p.name: p.read_bytes() for p in cli_out.iterdir() if p.is_file()}

    # All writers run at once; the CLI one is a fresh interpreter, the others are forks of this process.
    cli_args = ["-m", "cast_peft.cli", "diagnose", *common, "--seed", "1", "--output", str(cli_out), "--overwrite"]
    procs = {"cli-trashed": _start(cli_args, "trashed")}
    procs |= {stage: _Forked(stage, lambda t=target: make_map(1).save(t)) for stage, target in maps.items()}
    procs["adapter-config"] = _Forked("adapter-config", save_adapter, str(adapter), 1, {0: [1]})
    for stage, proc in procs.items():
        _kill_when_paused(proc, stage.removeprefix("cli-"))

    # Stopped between the map's two files, or after the new map replaced the old one.
    assert _same_map(ConflictMap.load(maps["map-between-files"]), old)
    assert _same_map(ConflictMap.load(maps["swapped"]), new)
    assert _leftovers(maps["map-between-files"]) and _leftovers(maps["swapped"])
    # Reruns work and clean up every leftover of the killed runs, saying so.
    with caplog.at_level(logging.WARNING):
        for target in maps.values():
            make_map(2).save(target)
            assert _same_map(ConflictMap.load(target), make_map(2))
            assert _leftovers(target) == []
    assert caplog.text.count("left by an interrupted run") == 2

    # The adapter re-save stopped after peft wrote the new weights, before the config: new weights, old skip set.
    assert (adapter / "adapter_model.safetensors").read_bytes() != old_adapter["adapter_model.safetensors"]
    assert (adapter / "cast_config.json").read_bytes() == old_adapter["cast_config.json"]
    with pytest.raises(AdapterError, match="different saves"):
        CASTLoraConfig.from_pretrained(str(adapter))
    # ... and the other pairing: the old weights beside a complete new save's cast_config.json.
    save_adapter(str(adapter), 1, {0: [1]})
    assert CASTLoraConfig.from_pretrained(str(adapter)).skip_heads == {0: [1]}
    (adapter / "adapter_model.safetensors").write_bytes(old_adapter["adapter_model.safetensors"])
    with pytest.raises(AdapterError, match="different saves"):
        CASTLoraConfig.from_pretrained(str(adapter))

    # The CLI killed between the swap's two renames: the target is missing, its old output lies whole in the trash,
    # and the next run starts by putting it back (then removes the killed run's temporary folder).
    assert not cli_out.exists()
    (trash,) = [p for p in _leftovers(cli_out) if ".cast-trash-" in p.name]
    assert {p.name: p.read_bytes() for p in trash.iterdir() if p.is_file()} == cli_old
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clean_stale(cli_out)
    assert {p.name: p.read_bytes() for p in cli_out.iterdir() if p.is_file()} == cli_old
    assert "restored" in caplog.text and "left by an interrupted run" in caplog.text
    assert _leftovers(cli_out) == []
    assert main(["diagnose", *common, "--seed", "1", "--output", str(cli_out), "--overwrite"]) == 0
    assert json.loads((cli_out / MARKER_NAME).read_text())["command"] == "cast-peft diagnose"
    assert _leftovers(cli_out) == [] and ConflictMap.load(cli_out / "map").metadata["seed"] == 1


def test_dead_runs_leftovers_are_removed_live_ones_kept(tmp_path, caplog):
    """Item 4: temp folders of dead runs (pid gone here; older than a day from another host) go, others stay."""
    from cast_peft._core.io import _host

    target = tmp_path / "map"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    dead = tmp_path / f".map.cast-tmp-{dead_pid}-00000000-{_host()}"
    live = tmp_path / f".map.cast-tmp-{os.getppid()}-00000000-{_host()}"
    old_foreign = tmp_path / ".map.cast-tmp-1-00000000-otherhost"
    young_foreign = tmp_path / ".map.cast-trash-1-00000001-otherhost"
    user_folder = tmp_path / ".map.backup"  # not our naming: never touched
    for folder in (dead, live, old_foreign, young_foreign, user_folder):
        folder.mkdir()
        (folder / "big.bin").write_bytes(b"x" * 1000)
    os.utime(old_foreign, (0, 0))
    with caplog.at_level(logging.WARNING):
        make_map(0).save(target)
    assert not dead.exists() and not old_foreign.exists()
    assert live.exists() and young_foreign.exists() and user_folder.exists()
    assert str(dead) in caplog.text and str(old_foreign) in caplog.text


# ----------------------------------------------------------------------------------------------------- refusals
def _refused(capsys, argv: list[str], match: str) -> None:
    """The command fails with one line on stderr naming ``match``, before loading the (missing) model."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_overwrite_refuses_what_cast_peft_did_not_write(tmp_path, monkeypatch, capsys):
    """Item 1; every case would have failed later (the model does not exist) had the output check not come first."""
    no_model = ["--model", str(tmp_path / "no-such-model")]
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    _refused(capsys, ["diagnose", *no_model, "--output", ".", "--overwrite"], "working directory")
    _refused(capsys, ["diagnose", *no_model, "--output", "..", "--overwrite"], "working directory")
    # A folder (written by cast-peft) that holds an input of the command: merge --adapter X/adapter --output X.
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / MARKER_NAME).write_text("{}")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    _refused(capsys, ["merge", *no_model, "--adapter", str(run / "adapter"), "--output", str(run), "--overwrite"],
             "an input of this command")  # fmt: skip
    # A folder of experiments that cast-peft did not write as a whole.
    runs = tmp_path / "runs"
    (runs / "exp1").mkdir(parents=True)
    (runs / "exp1" / MARKER_NAME).write_text("{}")
    _refused(capsys, ["diagnose", *no_model, "--output", str(runs), "--overwrite"], "not written by cast-peft")
    # Without --overwrite an existing folder is refused before the (long) evaluation, not after it.
    _refused(capsys, ["evaluate", *no_model, "--output", str(run)], "already exists; pass --overwrite")
    # A file, or a path under a file.
    _refused(capsys, ["diagnose", *no_model, "--output", "notes.txt"], "is a file")
    _refused(capsys, ["diagnose", *no_model, "--output", "notes.txt/sub"], "lies under the file")
    assert (work / "notes.txt").read_text() == "mine" and (runs / "exp1" / MARKER_NAME).exists()
    assert (run / "adapter" / "adapter_config.json").exists()
    # The library's saves follow the same rule: a folder with the user's files is not replaced by a map.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by cast-peft"):
        make_map(0).save(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_an_empty_existing_folder_is_used(tmp_path, tiny_dir):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["diagnose", "--model", str(tiny_dir), "--n-calibration", "2", "--max-length", "32",
                 "--output", str(out)]) == 0  # fmt: skip
    assert (out / "skip_heads.json").is_file() and (out / MARKER_NAME).is_file()


@pytest.mark.parametrize(
    "argv, argument",
    [
        (["diagnose", "--skip-ratio", "1.5"], "--skip-ratio"),
        (["diagnose", "--skip-ratio", "nan"], "--skip-ratio"),
        (["diagnose", "--n-calibration", "0"], "--n-calibration"),
        (["diagnose", "--n-calibration", "-1"], "--n-calibration"),
        (["diagnose", "--batch-size", "0"], "--batch-size"),
        (["diagnose", "--max-length", "0"], "--max-length"),
        (["evaluate", "--limit", "0"], "--limit"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--steps", "-1"], "--steps"),
        (["train", "--r", "0"], "--r"),
        (["train", "--lora-dropout", "1"], "--lora-dropout"),
        (["train", "--lr", "0"], "--lr"),
    ],
)
def test_arguments_are_validated_before_any_work(argv, argument, tmp_path, capsys):
    """Items 2 and 10 (CLI): out-of-range numbers are usage errors, before the (missing) model is looked at."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _without_root_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process (capset(2)): root then obeys permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for word in (0, 1):  # effective and permitted, capabilities 0-31
        data[word] &= ~((1 << 1) | (1 << 2))
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def test_unwritable_output_is_one_line_before_any_work(tmp_path):
    """Item 12 (CLI): a read-only output folder and an unwritable parent give one line, exit 2, no traceback."""
    readonly_parent = tmp_path / "ro"
    readonly_parent.mkdir()
    ours = tmp_path / "ours"  # a cast-peft output made read-only
    ours.mkdir()
    (ours / MARKER_NAME).write_text("{}")
    readonly_parent.chmod(0o555)
    ours.chmod(0o555)
    no_model = ["--model", str(tmp_path / "no-such-model")]
    cases = [["diagnose", *no_model, "--output", str(readonly_parent / "new")],
             ["merge", *no_model, "--adapter", str(tmp_path), "--output", str(ours), "--overwrite"]]  # fmt: skip

    def run_cases() -> None:
        if os.geteuid() == 0:  # root writes anywhere; without CAP_DAC_OVERRIDE it obeys the permission bits
            _without_root_override()
        for argv in cases:
            print("rc", main(argv), file=sys.stderr)

    try:
        child = _Forked("none", run_cases)
        stderr = child.stderr.read()
        assert child.wait() == 0, stderr
    finally:
        readonly_parent.chmod(0o755)
        ours.chmod(0o755)
    lines = stderr.strip().splitlines()
    assert lines[1::2] == ["rc 2", "rc 2"], stderr
    assert lines[0].startswith("error: cannot write in") and "permission denied" in lines[0]
    assert lines[2].startswith("error: ") and "read-only" in lines[2]
    assert (ours / MARKER_NAME).exists() and not (readonly_parent / "new").exists()


@pytest.mark.parametrize("umask, command", [(0o022, "diagnose"), (0o077, "train")])
def test_outputs_respect_the_umask(umask, command, tmp_path, tiny_dir):
    """Item 4: files 0666 & ~umask, folders 0777 & ~umask, like every other tool (0600/0700 before)."""
    out = tmp_path / "out"
    extra = ["--n-calibration", "2"] if command == "diagnose" else ["--steps", "1", "--r", "2"]
    previous = os.umask(umask)
    try:
        assert main([command, "--model", str(tiny_dir), "--max-length", "32", "--batch-size", "2", *extra,
                     "--output", str(out)]) == 0  # fmt: skip
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert len(paths) > 4
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


# ----------------------------------------------------------------------------------------------------- pickle
def test_no_pickle_loading_in_the_package_or_benchmarks():
    """Item 13: every torch.load passes weights_only=True (safetensors elsewhere); no pickle.load(s)."""
    root = SRC.parent
    offenders = []
    for path in [*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line:
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
