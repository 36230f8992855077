"""The report of a run: per setting its figures, time and samples; ``as_dict`` (JSON), ``write`` (eval.json with
the samples, eval.csv with one row per setting)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .intervals import METRICS, Figure
from .sweep import Setting


@dataclass
class SettingResult:
    setting: Setting
    figures: dict[str, Figure]
    seconds: float
    tokens: int
    gated_share: float | None = None
    samples: list[list[str]] = field(default_factory=list)

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        s = self.setting
        out: dict[str, Any] = {
            "family": s.family,
            "label": s.label,
            "swept": {k: json_number(v) for k, v in s.swept.items()},
            "params": {k: json_number(v) for k, v in s.params.items()},
            "figures": {k: f.as_dict() for k, f in self.figures.items()},
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
        }
        if self.gated_share is not None:
            out["gated_share"] = self.gated_share
        if with_samples:
            out["samples"] = self.samples
        return out


def json_number(v: Any) -> Any:
    """JSON has no infinity: ``inf``/``-inf`` as the strings the parameters accept."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


@dataclass
class Report:
    meta: dict[str, Any]
    results: list[SettingResult]
    reference: dict[str, Figure] | None = None

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        return {
            **self.meta,
            "settings": [r.as_dict(with_samples) for r in self.results],
            "reference": None if self.reference is None else {k: f.as_dict() for k, f in self.reference.items()},
        }

    def write(self, out: str | Path) -> list[Path]:
        """``eval.json`` (with the samples) and ``eval.csv`` (one row per setting) in ``out``."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        js = folder / "eval.json"
        js.write_text(json.dumps(self.as_dict(with_samples=True), indent=1, ensure_ascii=False) + "\n", "utf-8")
        csv_path = folder / "eval.csv"
        import csv

        names = [m for m in METRICS if any(m in r.figures for r in self.results)]
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(
                ["family", "setting", *[f"{m}{s}" for m in names for s in ("", "_low", "_high")]]
                + ["gated_share", "seconds", "tokens_per_second"]
            )
            for r in self.results:
                row: list[Any] = [r.setting.family, r.setting.label]
                for m in names:
                    fig = r.figures.get(m, Figure(None))
                    row += [fig.value, fig.low, fig.high]
                row += [r.gated_share, round(r.seconds, 3), round(r.tokens / r.seconds, 2) if r.seconds else None]
                w.writerow(row)
        return [js, csv_path]
