"""The pictures of ``edgeroute eval`` (matplotlib, the ``eval`` extra, imported when used; the Agg backend, no display).

- ``quality_diversity.png``: quality (judge perplexity, lower is better, log scale) against diversity, one point per
  setting with its bootstrap interval on both axes, the Pareto frontier of each family (no other setting of the
  family is both more diverse and better), the reference point when measured; two panels side by side, distinct-2
  and Self-BLEU-4 (its axis reversed, so that more diverse is to the right on both).
- ``diversity_by_value.png``: per family, distinct-2 and Self-BLEU-4 against the swept value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeroute.errors import MissingExtraError

from .extra import INSTALL_HINT


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    return plt


def pareto(points: Sequence[tuple[float, float]], more_is_diverse: bool = True) -> list[int]:
    """Indices of the points no other point dominates (more diverse and lower perplexity), by diversity."""
    sign = 1.0 if more_is_diverse else -1.0
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (sign * xj >= sign * x and yj <= y) and (sign * xj > sign * x or yj < y)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: sign * points[i][0])


def _fig(setting: Mapping[str, Any], name: str) -> tuple[float, float, float] | None:
    f = setting["figures"].get(name)
    if not f or f["value"] is None:
        return None
    lo = f["low"] if f["low"] is not None else f["value"]
    hi = f["high"] if f["high"] is not None else f["value"]
    return f["value"], lo, hi


def _families(report: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for s in report["settings"]:
        out.setdefault(s["family"], []).append(s)
    return out


def write_plots(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """Draw both pictures of a report (``Report.as_dict()``) into ``out``; returns their paths."""
    plt = _pyplot()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    families = _families(report)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    ref = report.get("reference")

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, metric, title, more in (
        (axes[0], "distinct_2", "distinct-2 (more diverse →)", True),
        (axes[1], "self_bleu4", "Self-BLEU-4 (more diverse →, reversed)", False),
    ):
        for n, (family, settings) in enumerate(families.items()):
            colour, marker = colours[n % len(colours)], markers[n % len(markers)]
            pts, labels = [], []
            for s in settings:
                x, y = _fig(s, metric), _fig(s, "perplexity")
                if x is None or y is None:
                    continue
                ax.errorbar(
                    x[0],
                    y[0],
                    xerr=[[x[0] - x[1]], [x[2] - x[0]]],
                    yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                    fmt=marker,
                    color=colour,
                    alpha=0.8,
                    capsize=2,
                    markersize=5,
                )
                pts.append((x[0], y[0]))
                labels.append(s["label"])
            if not pts:
                continue
            front = pareto(pts, more)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color=colour, label=family)
            for (x0, y0), label in zip(pts, labels, strict=True):
                value = label.split("=", 1)[-1] if label.count("=") == 1 else label
                ax.annotate(value, (x0, y0), fontsize=7, xytext=(3, 3), textcoords="offset points", color=colour)
        if ref:
            rx, ry = ref.get(metric), ref.get("perplexity")
            if rx and ry and rx["value"] is not None and ry["value"] is not None:
                ax.plot(rx["value"], ry["value"], "k*", markersize=14, label="reference (human text)")
        ax.set_yscale("log")
        if not more:
            ax.invert_xaxis()
        ax.set_xlabel(title)
        ax.set_ylabel("judge perplexity (lower is better)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{Path(str(report['model'])).name}: quality against diversity, {report['prompts']} prompts x"
        f" {report['samples']} samples, 95% bootstrap intervals; lines: each family's Pareto frontier",
        fontsize=10,
    )
    fig.tight_layout()
    first = folder / "quality_diversity.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    cols = min(len(families), 3)
    rows = math.ceil(len(families) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for n, (family, settings) in enumerate(families.items()):
        ax = grid[n // cols][n % cols]
        xs, ticks = _swept_axis(settings)
        for metric, colour, name in (
            ("distinct_2", colours[0], "distinct-2"),
            ("self_bleu4", colours[1], "Self-BLEU-4"),
        ):
            got = [(x, f) for x, s in zip(xs, settings, strict=True) if (f := _fig(s, metric)) is not None]
            if got:
                ax.errorbar(
                    [x for x, _ in got],
                    [f[0] for _, f in got],
                    yerr=[[f[0] - f[1] for _, f in got], [f[2] - f[0] for _, f in got]],
                    fmt="o-",
                    color=colour,
                    capsize=2,
                    label=name,
                )
        if ticks is not None:
            ax.set_xticks(xs, ticks, rotation=30, fontsize=7)
        ax.set_title(family, fontsize=10)
        ax.set_xlabel(_swept_name(settings))
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for n in range(len(families), rows * cols):
        grid[n // cols][n % cols].axis("off")
    fig.tight_layout()
    second = folder / "diversity_by_value.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def _swept_name(settings: Sequence[Mapping[str, Any]]) -> str:
    keys = list(settings[0]["swept"])
    return " × ".join(keys) if keys else "setting"


def _swept_axis(settings: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[str] | None]:
    """The swept value as x when it is one number per setting (±inf drawn at the ends), else the index."""
    values = [list(s["swept"].values()) for s in settings]
    if all(len(v) == 1 for v in values):
        maybe = [_number(v[0]) for v in values]
        nums = [x for x in maybe if x is not None]
        if len(nums) == len(maybe):
            finite = [x for x in nums if math.isfinite(x)]
            if len(finite) == len(nums):
                return nums, None
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
            span = hi - lo if hi > lo else 1.0
            xs = [x if math.isfinite(x) else (hi + 0.3 * span if x > 0 else lo - 0.3 * span) for x in nums]
            return xs, [str(v[0]) for v in values]
    return [float(i) for i in range(len(settings))], [s["label"] for s in settings]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("inf", "-inf"):
        return float(v)
    return None
