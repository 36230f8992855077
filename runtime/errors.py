"""The exception tree of edgeroute. The library raises these and never prints or exits.

::

    EdgerouteError
    ├── ModelLoadError                missing or corrupt files, manifest/graph mismatch
    │   ├── ManifestError             unknown schema version or bad field
    │   └── ProviderUnavailableError  an execution provider asked for is not installed or not working
    ├── ConfigError (ValueError)      .field and .value; raised when a config is built
    ├── MissingExtraError (ImportError) a feature's optional dependency is not installed (the message says how)
    ├── ChatTemplateError             the model's chat template failed, or ran past its time or size budget
    ├── ContextOverflowError          prompt + max_new_tokens beyond the context length
    ├── ConcurrentUseError            one Generator used from two threads at once (RuntimeError)
    ├── QueueFullError                an Engine's queue is full: retry later (RuntimeError)
    ├── EngineClosedError             the Engine was closed; requests still running end with it (RuntimeError)
    ├── InferenceError                onnxruntime failure (wrapped with ``raise ... from``), non-finite logits
    ├── AdapterError                  a LoRA adapter that cannot be read, does not fit the graph, or is not loaded
    ├── ExportError                   (edgeroute.export) unsupported architecture, missing extra, bad checkpoint
    │   └── ExportValidationError     the exported graph disagrees with the source model
    │       └── QualityGateError      (edgeroute.export) an encoder's int8/fp16 graph is below the quality gate
    └── RayServeError                 (edgeroute.serve.ray) a Ray Serve deployment could not start (RuntimeError)
        └── Interrupted               start() was stopped before the deployment was ready

``tests/test_package.py`` checks this tree against the classes. :func:`first_line` is the one way an error of
another library (onnxruntime, jinja, transformers) becomes the first line of an edgeroute error's message.
"""

from __future__ import annotations

from typing import Any


class EdgerouteError(Exception):
    """Base class of every error edgeroute raises on purpose."""


class ModelLoadError(EdgerouteError):
    """A model folder could not be loaded: missing or corrupt files, or a manifest that does not fit the graph."""


class ManifestError(ModelLoadError):
    """``edgeroute.json`` has an unknown schema version or a missing or invalid field."""


class ProviderUnavailableError(ModelLoadError):
    """The execution provider asked for is not installed or not working; never silently replaced."""


class ConfigError(EdgerouteError, ValueError):
    """An invalid configuration value. ``field`` names the setting and ``value`` is what was given."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class MissingExtraError(EdgerouteError, ImportError):
    """A feature needs an optional dependency that is not installed (structured output needs llguidance); the
    message is the one-line install command."""


class ChatTemplateError(EdgerouteError):
    """The model's chat template could not render: it has a bug (a syntax error, ``{{ 1/0 }}``, a recursive macro,
    an include), or it ran past its budget of time or output size. The message names the template."""


class ConcurrentUseError(EdgerouteError, RuntimeError):
    """A :class:`~edgeroute.Generator` was used from a second thread while a call on it was running. A Model is
    shared between threads; each thread needs its own Generator."""


class ContextOverflowError(EdgerouteError):
    """The prompt plus ``max_new_tokens`` does not fit into the model's context length."""

    def __init__(self, needed: int, context_length: int, detail: str = "") -> None:
        self.needed = needed
        self.context_length = context_length
        msg = f"{needed} tokens needed but the context holds {context_length}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class QueueFullError(EdgerouteError, RuntimeError):
    """An :class:`~edgeroute.Engine`'s queue holds ``max_queue`` requests already: retry later (a server answers
    429/503)."""


class EngineClosedError(EdgerouteError, RuntimeError):
    """The engine was closed: it takes no new request, and requests still running when it closed end with it."""


class InferenceError(EdgerouteError):
    """onnxruntime failed while running the graph (the original error is the ``__cause__``), or the graph
    returned logits that are not finite (NaN or +inf: broken weights)."""


class AdapterError(EdgerouteError):
    """A LoRA adapter could not be loaded or unloaded: a corrupt or unreadable file, a PEFT feature edgeroute does
    not run (DoRA, biases, ``modules_to_save``), a module, rank or shape the model's graph does not take (an adapter
    of another base), a graph without adapter inputs, a name already loaded or not loaded, or more adapters than
    ``max_adapters``. A request naming an adapter that is not loaded is a ``ConfigError`` on ``adapter``."""


class ExportError(EdgerouteError):
    """An export could not be done: unsupported architecture, missing extra, corrupt checkpoint."""


class ExportValidationError(ExportError):
    """The exported graph does not reproduce the source model within tolerance."""


def one_line(e: BaseException) -> str:
    """``e``'s whole message on one line (its whitespace runs made one space; the class name when it has none): an
    error as a command line or a server's log prints it."""
    return " ".join(str(e).split()) or type(e).__name__


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (the class name when it has none): what an error of another library adds
    to the edgeroute error that wraps it (chained with ``raise ... from``)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
