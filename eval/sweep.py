"""Sweeps: the settings a run measures, parsed from ``[NAME:] key=v1,v2 key2=v ...``, and their configs.

A *setting* is a set of request parameters (``edgeroute.params``'s names) laid over a common base; a *family* is
the settings of one sweep (:func:`parse_sweep`): ``"temperature=0.3,0.7,1.0"`` is a family of three,
``"explore-exp: explore=0.05,0.1 explore_schedule=exponential explore_end=0.001 explore_steps=32"`` a named one.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeroute.config import GenerationConfig
from edgeroute.errors import ConfigError
from edgeroute.params import Flows, from_params

if TYPE_CHECKING:
    from edgeroute.model import Model


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: its family, a label (the swept parameters), and every parameter it sets."""

    family: str
    label: str
    params: Mapping[str, Any]
    swept: Mapping[str, Any] = field(default_factory=dict)


_INT = re.compile(r"[+-]?\d+")


def parse_value(text: str) -> Any:
    """A sweep value: an int, a float (``inf``, ``-inf``), ``true``/``false``, ``none``, else the text."""
    low = text.strip().lower()
    if _INT.fullmatch(low):
        return int(low)
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        value = float(low)
    except ValueError:
        return text
    return value if not math.isnan(value) else text


def parse_sweep(spec: str) -> list[Setting]:
    """``[NAME:] key=v1,v2 key2=v ...`` -> the family's settings (the product of the keys with several values).

    Raises ``ConfigError`` (field ``sweep``) for a spec that is not of that form.
    """
    text = spec.strip()
    name = None
    head, sep, rest = text.partition(":")
    if sep and "=" not in head and head.strip() and " " not in head.strip():
        name, text = head.strip(), rest
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise ConfigError("sweep", spec, f"cannot be parsed ({e})") from None
    if not items:
        raise ConfigError("sweep", spec, "is empty: write key=v1,v2 ...")
    keys: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not values:
            raise ConfigError("sweep", item, "is not key=value[,value...]")
        if key in keys:
            raise ConfigError("sweep", item, f"sets {key} twice")
        if key == "seed":
            raise ConfigError("sweep", item, "eval sets the seeds itself (give --seed for the base)")
        keys[key] = [parse_value(v) for v in values.split(",")]
    varying = [k for k, v in keys.items() if len(v) > 1]
    fixed = {k: v[0] for k, v in keys.items() if len(v) == 1}
    family = name or ("×".join(varying) if varying else " ".join(items))
    out = []
    for combo in itertools.product(*(keys[k] for k in varying)):
        swept = dict(zip(varying, combo, strict=True))
        label = " ".join(f"{k}={_show(v)}" for k, v in swept.items()) or " ".join(items)
        out.append(Setting(family, label, {**fixed, **swept}, swept))
    return out


def parse_sweeps(specs: Sequence[str]) -> list[Setting]:
    """Several sweeps (command-line ``--sweep`` values or the lines of a sweep file); labels must differ."""
    settings = [s for spec in specs for s in parse_sweep(spec)]
    seen: set[tuple[str, str]] = set()
    for s in settings:
        if (s.family, s.label) in seen:
            raise ConfigError("sweep", f"{s.family}: {s.label}", "appears twice (name the sweeps: NAME: key=...)")
        seen.add((s.family, s.label))
    return settings


def read_sweep_file(path: str | Path) -> list[str]:
    """A sweep file: one sweep per line, ``#`` comments and blank lines ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _show(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"
    return str(v)


def setting_configs(
    settings: Sequence[Setting],
    base: Mapping[str, Any] | None = None,
    max_new_tokens: int = 64,
    load: Callable[[str], Model] | None = None,
) -> list[tuple[GenerationConfig, Flows]]:
    """Every setting's configs (base, then the setting), validated before anything runs; a ``ConfigError`` names
    the parameter and the setting."""
    out = []
    for s in settings:
        params = {"max_new_tokens": max_new_tokens, **(base or {}), **s.params}
        try:
            out.append(from_params(params, None, load))
        except ConfigError as e:
            where = s.label if s.family == s.label else f"{s.family}: {s.label}"
            raise ConfigError(e.field, e.value, f"{e.reason} (in the setting {where})") from None
    return out
