"""edgeroute.serve: an OpenAI-compatible HTTP server over :class:`edgeroute.Engine` (the ``serve`` extra).

>>> from edgeroute.serve import Settings, create_app                      # doctest: +SKIP
>>> app = create_app(er.Model.load("models/smollm2-135m"), Settings("smollm2"))  # any ASGI server runs it

``edgeroute serve MODEL`` runs it under uvicorn (:func:`serve`). The runtime itself never imports this package:
the web stack (Starlette, uvicorn, prometheus-client) is an extra, ``pip install 'edgeroute[serve]'``.
"""

from __future__ import annotations

INSTALL_HINT = "the server needs the serve extra: pip install 'edgeroute[serve]'"

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_serve.py in a subprocess
    raise ImportError(f"{INSTALL_HINT} ({e.name} is missing)", name=e.name) from e

from .app import Settings, State, create_app  # noqa: E402
from .protocol import APIError  # noqa: E402
from .server import serve  # noqa: E402

__all__ = ["APIError", "INSTALL_HINT", "Settings", "State", "create_app", "serve"]
