"""Every exception and warning cast-peft raises, under one base class.

Each class also derives from the built-in exception that code written before it expected (``ValueError`` for bad
input, ``RuntimeError`` for a run that went wrong), so ``except ValueError`` keeps working. Messages say what to do.
"""

from __future__ import annotations


class CastError(Exception):
    """Base class of every error cast-peft raises on purpose; ``except cast_peft.CastError`` catches them all."""


class ConfigError(CastError, ValueError):
    """A setting or skip set that cannot be used (out of range, of the wrong type, or one that would move a
    skipped head)."""


class UnsupportedArchitectureError(ConfigError):
    """The model's attention layout is not one CAST knows; CAST refuses to guess."""


class DataError(CastError, ValueError):
    """Empty, malformed or incomplete data."""


class ConflictMapError(CastError, ValueError):
    """A conflict map that cannot be used: corrupt, partial, foreign or made for another model."""


class DiagnosisError(CastError, RuntimeError):
    """The diagnosis could not produce a valid map (non-finite loss or gradient, a model it cannot run)."""


class AdapterError(CastError, ValueError):
    """An adapter folder that cannot be used as a CAST adapter (corrupt, mismatched files, unsafe format)."""


class ModelLoadError(CastError, RuntimeError):
    """A model that cannot be loaded (not a model folder, unsafe weights format, default model unavailable)."""


class OutputError(CastError, ValueError):
    """An output path that cast-peft will not write to or replace (it would delete something the user wrote)."""


class FrozenHeadsError(CastError, RuntimeError):
    """A skipped head is not frozen: its LoRA slice is non-zero, its masks are missing, or its base slice moved."""


class CastWarning(UserWarning):
    """Warnings issued by cast-peft (filter them like peft's ``PeftWarning``)."""
