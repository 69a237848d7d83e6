"""The `cast-peft` command line: diagnose | train | evaluate | merge | demo."""

from .main import build_parser, main


__all__ = ["build_parser", "main"]
