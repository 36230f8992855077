"""edgeroute: run exported ONNX language models with a NumPy token router.

>>> import edgeroute as er
>>> model = er.Model.load("models/smollm2-135m")                          # doctest: +SKIP
>>> cfg = er.GenerationConfig(max_new_tokens=64, sampling=er.SamplingConfig(temperature=0.7, seed=7))
>>> print(model.generate("The capital of France is", cfg).text)          # doctest: +SKIP
"""

from ._version import __version__
from .adapters import Adapter
from .chat import ChatSession
from .config import GenerationConfig, SamplingConfig
from .constraint import Constraint, Grammar, JsonObject, JsonSchema, Regex
from .contract import GraphContract
from .encoder import Embeddings, EncoderModel
from .engine import Engine, EngineStats
from .errors import (
    AdapterError,
    ChatTemplateError,
    ConcurrentUseError,
    ConfigError,
    ContextOverflowError,
    EdgerouteError,
    EngineClosedError,
    ExportError,
    ExportValidationError,
    InferenceError,
    ManifestError,
    MissingExtraError,
    ModelLoadError,
    ProviderUnavailableError,
    QueueFullError,
)
from .generator import Generator
from .kv_cache import KVCache
from .manifest import Manifest
from .model import Model, load
from .output import Completion, Hypothesis, Step, TokenLogprob, Usage
from .params import Flows, from_params
from .prefix_cache import PrefixCache, PrefixCacheStats, PrefixEntry
from .request import Request
from .sampling import Distribution, Processor, Router, Truncation, make_chain
from .scoring import Score, TokenScore
from .session import available_providers
from .tokenizer import Tokenizer

__all__ = [
    "__version__",
    "Adapter",
    "AdapterError",
    "ChatSession",
    "ChatTemplateError",
    "Completion",
    "Hypothesis",
    "ConcurrentUseError",
    "Constraint",
    "ConfigError",
    "ContextOverflowError",
    "Distribution",
    "EdgerouteError",
    "Engine",
    "EngineClosedError",
    "EngineStats",
    "ExportError",
    "ExportValidationError",
    "Flows",
    "GenerationConfig",
    "Grammar",
    "Generator",
    "GraphContract",
    "InferenceError",
    "JsonObject",
    "JsonSchema",
    "KVCache",
    "Manifest",
    "ManifestError",
    "MissingExtraError",
    "Model",
    "load",
    "EncoderModel",
    "Embeddings",
    "ModelLoadError",
    "PrefixCache",
    "PrefixCacheStats",
    "PrefixEntry",
    "Processor",
    "ProviderUnavailableError",
    "QueueFullError",
    "Regex",
    "Request",
    "Router",
    "SamplingConfig",
    "Score",
    "Step",
    "TokenLogprob",
    "TokenScore",
    "Tokenizer",
    "Truncation",
    "Usage",
    "available_providers",
    "from_params",
    "make_chain",
]
