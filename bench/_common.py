"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "smollm2-135m"


def need_model(path: Path) -> Path:
    if not (path / "edgeroute.json").is_file():
        sys.exit(f"no model at {path}: run `make demo` (or edgeroute export) first")
    return path


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6
