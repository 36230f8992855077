"""A submitted request's handle: :class:`Request`, thread-safe, iterated (blocking or ``async for``) for its steps,
cancelled, or waited on for its result. The :class:`~edgeroute.Engine` creates and feeds it; callers only read it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from .config import GenerationConfig
from .output import Completion, Step
from .params import Flows

if TYPE_CHECKING:
    from .adapters import Adapter
    from .generator import Generator
    from .sequence import TokenSequence


class Request:
    """One submitted request: iterate it for its :class:`Step`\\ s (blocking, or ``async for``), or wait for its
    :meth:`result`. Safe to read from any thread; several readers each see every step."""

    def __init__(self, rid: int, prompt: list[int], config: GenerationConfig, flows: Flows) -> None:
        self.id = rid
        self.prompt = prompt
        self.config = config
        self.flows = flows
        self.submitted = time.perf_counter()
        self._cond = threading.Condition()
        self._readers = 0  # threads waiting in _wait: a step wakes them only when there are some
        self._ended = threading.Event()
        self._steps: list[Step] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancel = False
        self._listeners: list[Any] = []
        # what the engine built for it at submission (never on the engine's thread, where a failure could reach
        # other requests): its own Generator (solo), or its token sequence (batched: ids, chooser, text output, usage)
        self._generator: Generator | None = None
        self._sequence: TokenSequence | None = None
        self._adapter: Adapter | None = None  # the LoRA adapter its row runs (batched), resolved at submission

    # -- the engine's side ------------------------------------------------------------------------------------
    def _push(self, step: Step) -> None:
        # a waiting thread woken per token would take the GIL from the engine's thread mid-step: wake only readers
        self._steps.append(step)  # list.append is atomic; readers read under the lock
        if self._readers or self._listeners:
            with self._cond:
                self._cond.notify_all()
                listeners = list(self._listeners)
            for notify in listeners:
                notify()

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._completion, self._error = completion, error
            # what ran it goes now, not when the handle goes: a caller may hold a finished handle long (a cancelled
            # stream's handle sits in a reference cycle until a full collection), and a router holds arrays of the
            # vocabulary's size
            self._generator = self._sequence = None
            self._ended.set()
            self._cond.notify_all()
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    # -- the caller's side ------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the request finished, failed or was cancelled."""
        return self._completion is not None or self._error is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def cancel(self) -> None:
        """Stop generating: the slot is freed within one engine iteration; the result is what was generated so
        far, with ``finish_reason == "cancelled"``."""
        self._cancel = True

    def _wait(self, i: int, timeout: float | None) -> tuple[Step | None, bool]:
        """Step ``i`` when there is one, else ``(None, True)`` once the request is done (raising its error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._readers += 1  # before looking: a step appended after the look sees this reader and wakes it
            try:
                while i >= len(self._steps) and not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id}: no step within {timeout} s")
                    self._cond.wait(left)
            finally:
                self._readers -= 1
            if i < len(self._steps):
                return self._steps[i], False
            if self._error is not None:
                raise self._error
            return None, True

    def __iter__(self) -> Iterator[Step]:
        return self.stream()

    def stream(self, timeout: float | None = None) -> Iterator[Step]:
        """Like iterating the request, with ``timeout`` seconds at most between two steps (``TimeoutError``)."""
        i = 0
        while True:
            step, end = self._wait(i, timeout)
            if end:
                return
            assert step is not None
            yield step
            i += 1

    async def __aiter__(self) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:
            loop.call_soon_threadsafe(wake.set)

        with self._cond:
            self._listeners.append(notify)
        try:
            i = 0
            while True:
                with self._cond:
                    ready = i < len(self._steps)
                    step = self._steps[i] if ready else None
                    done, error = self.done, self._error
                    if not ready:
                        wake.clear()
                if step is not None:
                    yield step
                    i += 1
                    continue
                if done:
                    if error is not None:
                        raise error
                    return
                await wake.wait()
        finally:
            with self._cond:
                self._listeners.remove(notify)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to end and return its :class:`Completion` (raises its error, if it failed)."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion
