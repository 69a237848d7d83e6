"""Two CPU processes (gloo) for the distributed tests: the one way they are started, with this checkout's cast_peft."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"  # the checkout's cast_peft, also in the child processes


def launch_two(target: list[str], *, port: int, launcher: str = "torchrun", scratch: Path | None = None,
               timeout: int = 280) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``target`` (a script and its arguments, or ``["-m", module, ...]``) on 2 processes started by ``torchrun``
    or ``accelerate launch``; fail with the processes' output unless both exit 0. Each test uses its own ``port``.

    accelerate 1.15 on CPU: ``--cpu`` or ``distributed_type: MULTI_CPU`` start ONE process unless mpirun is
    configured, so 2 CPU processes come from its multi-GPU launcher (torch.distributed.run), and the program's
    ``PartialState(cpu=True)`` picks gloo. A config file of our own (written in ``scratch``) keeps a user's default
    config out.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    elif launcher == "accelerate":
        assert scratch is not None, "accelerate launch needs a scratch folder for its config file"
        config = scratch / "accelerate.yaml"
        config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                          f"num_processes: 2\nmain_process_port: {port}\nmixed_precision: 'no'\nuse_cpu: false\n")  # fmt: skip
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    else:
        raise ValueError(f"launcher={launcher!r}")
    result = subprocess.run([*head, *target], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
