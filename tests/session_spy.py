"""A model whose graph runs call a function first (to record, slow down or fail them): the engine's and the
server's tests watch and break graph runs through it."""

from __future__ import annotations

from collections.abc import Callable

import edgeroute as er


class Spied:
    """A model's session that calls ``before()`` at the start of every graph run (which may record or raise)."""

    def __init__(self, inner: object, before: Callable[[], None]) -> None:
        self.inner, self.before = inner, before

    def run_with_iobinding(self, io: object) -> None:
        self.before()
        self.inner.run_with_iobinding(io)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def spied(model: er.Model, before: Callable[[], None]) -> er.Model:
    """A second load of ``model`` whose graph runs call ``before()`` first."""
    other = er.Model.load(model.path)
    other.session = Spied(other.session, before)
    return other
