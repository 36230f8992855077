"""The progress of long commands on stderr: a tqdm bar per step on a terminal, plain lines otherwise.

``edgeroute export``, ``eval`` and ``bench`` (and the long scripts under bench/) show their steps through
:class:`Steps`:

- on a terminal (the stream is a TTY) with tqdm installed (the export, eval and dev extras): one bar per step,
  with its total where the step knows one (tensors read, layers built, calibration chunks, weights quantised,
  texts validated, samples generated, runs), else a counter; the elapsed time is redrawn every ``TICK`` seconds
  so that a step without counts never looks stuck;
- otherwise (a pipe, a log file, CI; or tqdm missing from a core install): plain lines and never a carriage
  return: ``export: quantising int4 ...`` when a step starts, ``export: quantising int4 done in 12.3 s (211
  weights)`` when it ends, and where it stands every ``PLAIN_EVERY`` seconds in between.

The library never prints: ``edgeroute.export.export_model`` reports ``progress(step, event, value)``
(:meth:`Steps.callback` turns it into bars or lines; ``edgeroute.export.steps`` describes it) and
``edgeroute.evaluation.evaluate`` ``progress(samples)`` (:meth:`Steps.advance`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, TextIO

TICK = 0.5  # seconds between redraws of a bar (its elapsed time) while nothing advances
PLAIN_EVERY = 30.0  # seconds between the plain lines saying where a long step stands
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}]"
COUNTER_FORMAT = "{desc}: {n_fmt}{unit} [{elapsed}]"
TIMER_FORMAT = "{desc} [{elapsed}]"


def tqdm_class() -> Any:
    """tqdm's bar class, or None when tqdm is not installed (imported only when a terminal asks for bars)."""
    try:
        return importlib.import_module("tqdm").tqdm
    except ImportError:
        return None


def screen_size(stream: Any) -> tuple[int, int] | None:
    """The terminal's columns and lines, or None when the stream has none (a fake or sizeless terminal: tqdm
    would draw nothing at 0 x 0)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # no fileno, a closed stream, not a terminal
        return None
    return (size.columns, size.lines) if size.columns > 0 and size.lines > 0 else None


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Steps:
    """The steps of one command, shown one after another on ``stream`` (default: stderr), each line or bar
    prefixed ``"{command}: "``. ``bars``: None decides by the stream (a terminal and tqdm installed); False forces
    plain lines; True asks for bars (plain lines still when tqdm is missing).

    ``with steps.step(label, total, unit):`` or ``start`` / ``total`` / ``advance`` / ``done``; a step started
    while another runs ends that one first. Closing (``with Steps(...)``) ends a running step, as failed when an
    exception is on its way.
    """

    def __init__(self, command: str, stream: TextIO | None = None, bars: bool | None = None) -> None:
        self.command = command
        self.stream: TextIO = stream if stream is not None else sys.stderr
        want = is_terminal(self.stream) if bars is None else bars
        self._tqdm = tqdm_class() if want else None
        self._lock = threading.RLock()
        self._label: str | None = None
        self._unit = ""
        self._total: int | None = None
        self._n = 0
        self._t0 = 0.0
        self._said = 0.0  # when the last plain line about the running step was written
        self._bar: Any = None
        self._stop = threading.Event()  # the running bar's redrawing thread stops when it is set (never joined:
        # it may be waiting for the lock that ending the step holds; it touches no bar once its event is set)

    @property
    def bars(self) -> bool:
        """True when the steps are drawn as tqdm bars."""
        return self._tqdm is not None

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.done(failed=kind is not None)

    @contextlib.contextmanager
    def step(self, label: str, total: int | None = None, unit: str = "") -> Iterator[Steps]:
        """A step around a block (ended as failed when the block raises)."""
        self.start(label, total, unit)
        try:
            yield self
        except BaseException:
            self.done(failed=True)
            raise
        self.done()

    def start(self, label: str, total: int | None = None, unit: str = "") -> None:
        """A step begins; ``total`` units of work (``unit``, plural) where it knows them."""
        with self._lock:
            self.done()
            self._label, self._unit, self._total, self._n = label, unit, total, 0
            self._t0 = self._said = time.perf_counter()
            if self._tqdm is None:
                count = f" ({total} {unit})" if total is not None and unit else ""
                self._line(f"{label}{count} ...")
                return
            sized = screen_size(self.stream) is not None  # else a fixed 80 x 24
            self._bar = self._tqdm(
                total=total,
                desc=f"{self.command}: {label}",
                unit=f" {unit}" if unit else "",
                bar_format=self._format(),
                file=self.stream,
                leave=True,
                dynamic_ncols=sized,
                ncols=None if sized else 80,
                nrows=None if sized else 24,
                mininterval=0.1,
            )
            self._stop = threading.Event()
            threading.Thread(target=self._tick, args=(self._stop,), daemon=True).start()

    def total(self, n: int) -> None:
        """The running step turns out to have ``n`` units of work."""
        with self._lock:
            if self._label is None:
                return
            self._total = n
            if self._bar is not None:
                self._bar.total = n
                self._bar.bar_format = self._format()
                self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the running step are finished."""
        with self._lock:
            if self._label is None:
                return
            self._n += n
            if self._bar is not None:
                if self._bar.bar_format == TIMER_FORMAT and self._unit:
                    self._bar.bar_format = self._format()
                self._bar.update(n)
                return
            now = time.perf_counter()
            if now - self._said >= PLAIN_EVERY and self._n != self._total:  # the last: the done line says it
                self._said = now
                self._line(f"{self._label}: {self._count()}, {now - self._t0:.0f} s")

    def done(self, seconds: float | None = None, failed: bool = False) -> float | None:
        """End the running step (if any) and return its seconds (``seconds``: as the library measured them)."""
        with self._lock:
            if self._label is None:
                return None
            took = time.perf_counter() - self._t0 if seconds is None else seconds
            label, self._label = self._label, None
            if self._bar is not None:
                self._stop.set()
                bar, self._bar = self._bar, None
                bar.close()
            else:
                count = self._count()
                if failed:
                    self._line(f"{label} stopped after {took:.1f} s" + (f" ({count})" if count else ""))
                else:
                    self._line(f"{label} done in {took:.1f} s" + (f" ({count})" if count else ""))
        return took

    def callback(
        self, labels: Mapping[str, str] | None = None, units: Mapping[str, str] | None = None
    ) -> Callable[[str, str, float], None]:
        """A ``progress(step, event, value)`` callback for the library (``edgeroute.export.steps``): each step
        shown as ``labels[step]`` (default: its name) counting ``units[step]``."""
        labels, units = labels or {}, units or {}

        def report(step: str, event: str, value: float) -> None:
            if event == "start":
                self.start(labels.get(step, step), unit=units.get(step, ""))
            elif event == "total":
                self.total(int(value))
            elif event == "advance":
                self.advance(int(value))
            elif event == "done":
                self.done(seconds=value)

        return report

    def _format(self) -> str:
        if self._total is not None:
            return BAR_FORMAT
        return COUNTER_FORMAT if self._unit and self._n else TIMER_FORMAT

    def _count(self) -> str:
        if not self._unit or (self._total is None and not self._n):
            return ""
        if self._total is None or self._n == self._total:
            return f"{self._n} {self._unit}"
        return f"{self._n}/{self._total} {self._unit}"

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.command}: {text}\n")
        self.stream.flush()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            with self._lock:
                if self._bar is not None and not stop.is_set():
                    self._bar.refresh()
