"""Multi-process diagnosis worker: ``torchrun --standalone --nproc_per_node 2 tests/_diag_worker.py OUT``, or the same
through ``accelerate launch --multi_gpu --num_processes 2`` (on CPU that is torch.distributed.run too).

Each process first diagnoses before any process group exists (the launcher set ``WORLD_SIZE`` only): it saves that
map to ``OUT/alone<r>`` and the warnings it got to ``OUT/alone<r>.txt``. Then it joins the group through accelerate
(``PartialState(cpu=True)``: gloo on CPU), diagnoses the same tiny model on the same batches (sharded by the
diagnosis) and saves its map to ``OUT/rank<r>``. The test compares those maps with a single-process run of
:func:`inputs`.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import build_tiny_model, tiny_batch  # noqa: E402


OPTIONS = {"sensitivity": "ablation", "kv_scoring": "separate", "progress": False, "seed": 3}


def labelled_batches(seed: int, count: int, rows: int = 3, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Batches with a masked prompt (first 4 tokens) and one right-padded row."""
    out = []
    for i in range(count):
        batch = tiny_batch(seed + i, batch=rows, length=length)
        batch["labels"][:, :4] = -100
        batch["attention_mask"][-1, length - 2 :] = 0
        batch["labels"][-1, length - 2 :] = -100
        out.append(batch)
    return out


def inputs():
    """The model and data every process (and the single-process reference) uses; odd batch counts on purpose."""
    return build_tiny_model("llama"), labelled_batches(0, 5), labelled_batches(100, 3)


def main(out: str) -> None:
    from accelerate import PartialState

    from cast_peft.diagnosis import diagnose

    model, safety, utility = inputs()
    rank = os.environ["RANK"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnose(model, None, safety, utility, **OPTIONS).save(Path(out) / f"alone{rank}")
    (Path(out) / f"alone{rank}.txt").write_text("\n".join(str(w.message) for w in caught))
    state = PartialState(cpu=True)
    model, safety, utility = inputs()
    cmap = diagnose(model, None, safety, utility, **OPTIONS)
    cmap.save(Path(out) / f"rank{state.process_index}")
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
