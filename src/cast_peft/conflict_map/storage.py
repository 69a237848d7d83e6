"""Storage of a conflict map: one safetensors file and one JSON file, written all or nothing, checked on load.

Format version 1: ``conflict_map.safetensors`` holds the measured tensors (``stats_q|k|v|o``, ``fs_signed``,
``fs_kv_signed``), the derived ``oc``/``fs``/``score`` (for readers without cast-peft) and ``extra.NAME`` tensors;
``conflict_map.json`` holds the head counts, the scoring choices, the metadata and the sha256 of the tensor file, so
a mixed pair of files is detected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._core.errors import ConflictMapError
from .._core.io import output_folder, pause_point, sha256_file
from ..geometry import ROLES, HeadCounts


FORMAT = "cast-peft/conflict-map"
FORMAT_VERSION = 1
TENSORS_FILE = "conflict_map.safetensors"
META_FILE = "conflict_map.json"


def write_map(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the two files into ``directory`` through a folder built beside it and swapped in.

    An existing ``directory`` is replaced only if it holds a map (and nothing else).
    """
    from safetensors.torch import save_file

    with output_folder(directory, command="ConflictMap.save", overwrite=True,
                       replaceable=(TENSORS_FILE, META_FILE)) as tmp:  # fmt: skip
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        pause_point("map-between-files")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        meta["tensors_sha256"] = sha256_file(tmp / TENSORS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return Path(directory)


def read_map(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``ConflictMap`` constructor arguments stored in ``directory``; a missing, partial, corrupt or foreign
    folder is a `ConflictMapError` that says what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
    if not directory.is_dir():
        raise ConflictMapError(f"{directory} is not a folder; pass the folder given to ConflictMap.save().")
    if not meta_path.is_file():
        hint = " (the tensors are there: the save was interrupted)" if tensor_path.exists() else ""
        raise ConflictMapError(
            f"{directory} has no {META_FILE}{hint}; it is not a saved conflict map. Diagnose again and save it."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConflictMapError(
            f"{meta_path} is not valid JSON ({err}); the file is corrupt. Save the map again."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConflictMapError(
            f"{meta_path} is not a cast-peft conflict map (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})."
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConflictMapError(
            f"{directory} was written by a newer cast-peft (format version "
            f"{meta['format_version']} > {FORMAT_VERSION}); upgrade cast-peft."
        )
    if not tensor_path.is_file():
        raise ConflictMapError(f"{directory} lacks {TENSORS_FILE}: the map is incomplete. Save it again.")
    if sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise ConflictMapError(
            f"{tensor_path} does not match {META_FILE} (checksum differs): the files are "
            "corrupt or from different saves. Save the map again."
        )
    try:
        tensors = load_file(str(tensor_path))
        return {
            "counts": HeadCounts.from_dict(meta["counts"]),
            "stats": {role: tensors[f"stats_{role}"] for role in ROLES},
            "fs_signed": tensors["fs_signed"],
            "fs_kv_signed": tensors.get("fs_kv_signed"),
            "kv_scoring": meta["kv_scoring"],
            "combine": meta["combine"],
            "normalization": meta["normalization"],
            "metadata": meta.get("metadata", {}),
            "extras": {name: tensors[f"extra.{name}"] for name in meta.get("extras", [])},
        }
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, ConflictMapError):
            raise
        raise ConflictMapError(
            f"{directory} holds an unreadable conflict map ({type(err).__name__}: {err}). Save it again."
        ) from None
