"""How an export reports its steps: the library never prints, it calls the ``progress`` callback it is given.

``progress(step, event, value)``, per step in this order, steps one after another (never nested):

- ``"start"``, 0.0: the step begins;
- ``"total"``, n: the step has n units of work (``UNITS[step]``), sent once it knows (not every step does: a
  checkpoint folder's load, optimum's export and the fp16 cast report none);
- ``"advance"``, k: k more units are finished (any number of times);
- ``"done"``, seconds: the step ended, after that long (a step that raises sends no ``"done"``).

A callback ignores events it does not know (a later version may add some). The steps: ``load``, ``export``
(fused: the layers built; optimum: no count), ``post-process`` (optimum), ``calibrate`` (int4: the chunks of the
calibration text run through the float graph), ``quantise`` (the weights quantised), ``fp16``, ``cuda check``,
``validate`` (the texts compared with PyTorch), ``quality`` (an encoder's int8 model measured against fp32).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Progress = Callable[[str, str, float], None]  # (step, "start" | "total" | "advance" | "done", value)
UNITS = {
    "load": "tensors",
    "export": "layers",
    "calibrate": "chunks",
    "quantise": "weights",
    "validate": "texts",
    "quality": "texts",
}


class Step:
    """A running step: what the code doing the work tells the callback (nothing when there is none)."""

    def __init__(self, name: str, progress: Progress | None) -> None:
        self.name = name
        self.progress = progress

    def total(self, n: int) -> None:
        if self.progress:
            self.progress(self.name, "total", float(n))

    def advance(self, n: int = 1) -> None:
        if self.progress:
            self.progress(self.name, "advance", float(n))


NO_STEP = Step("", None)


class Stages:
    """``with stages(name) as step:`` reports a step's start and end to ``progress`` and keeps its time."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.progress = progress
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[Step]:
        t0 = time.perf_counter()
        if self.progress:
            self.progress(name, "start", 0.0)
        yield Step(name, self.progress)
        self.times[name] = round(time.perf_counter() - t0, 3)
        if self.progress:
            self.progress(name, "done", self.times[name])
