"""The ``eval`` extra (sacrebleu, matplotlib, jsonschema): the install line, and the check a run makes first."""

from __future__ import annotations

import importlib.util

from edgeroute.errors import MissingExtraError

INSTALL_HINT = "edgeroute eval needs the eval extra: pip install 'edgeroute[eval]' (sacrebleu, matplotlib, jsonschema)"


def require(plots: bool = False, constraint: bool = False) -> None:
    """Check the extras a run needs before it starts (it is long work): sacrebleu, and matplotlib for the
    pictures, jsonschema for a constraint's validity; ``MissingExtraError`` with the install line otherwise."""
    needed = ["sacrebleu"] + (["matplotlib"] if plots else []) + (["jsonschema"] if constraint else [])
    if any(importlib.util.find_spec(name) is None for name in needed):
        raise MissingExtraError(INSTALL_HINT)
