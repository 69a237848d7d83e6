"""Tests of the benchmark code: the benchmark modules import as top-level modules, as when a script runs."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
