"""The router's second level: one vector of logits -> one token.

- :mod:`.ops`: the pure NumPy operations (penalties, top-k, top-p, min-p, typical, softmax, the draw);
- :mod:`.stages`: the stages (:class:`Processor`, :class:`Truncation`, :class:`Explore`), each with its fast
  forms where it has them;
- :mod:`.fast`: the float path's candidate set (:class:`Few`), which truncations' fast forms cut;
- :mod:`.router`: :class:`Router`, :class:`Distribution` and :func:`make_chain`.

Adding a stage is writing a :class:`Processor` or a :class:`Truncation` and passing it to :func:`make_chain`.
The package knows nothing of the graph layer (model, caches, session, contract) or of text output.
"""

from .fast import FEW, FastCut, Few
from .ops import (
    Ids,
    NoCandidates,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    draw,
    explore_mix,
    log_softmax,
    min_p,
    softmax,
    top_k,
    top_logprobs,
    top_p,
    typical,
)
from .ops import _top_k_positions as _top_k_positions
from .ops import _weights as _weights
from .router import Distribution, Router, make_chain
from .stages import (
    Constraining,
    Explore,
    LogitBias,
    MinP,
    Penalties,
    Processor,
    Suppress,
    Temperature,
    TopK,
    TopP,
    Truncation,
    Typical,
)

__all__ = [
    "FEW",
    "Constraining",
    "Distribution",
    "Explore",
    "FastCut",
    "Few",
    "Ids",
    "LogitBias",
    "MinP",
    "NoCandidates",
    "Penalties",
    "Processor",
    "Router",
    "Suppress",
    "Temperature",
    "TopK",
    "TopP",
    "Truncation",
    "Typical",
    "apply_logit_bias",
    "apply_penalties",
    "apply_temperature",
    "draw",
    "explore_mix",
    "log_softmax",
    "make_chain",
    "min_p",
    "softmax",
    "top_k",
    "top_logprobs",
    "top_p",
    "typical",
]
