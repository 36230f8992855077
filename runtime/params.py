"""Requests to configs: plain parameters (OpenAI's names and edgeroute's own) -> validated configs.

The command line, the Python API and a server build a request's settings the same way: :func:`from_params`
takes a mapping of plain values (what a JSON body or a set of flags holds), lays it over a model's generation
defaults, and returns a :class:`~edgeroute.GenerationConfig` and the level-1 :class:`Flows`, or raises
``ConfigError`` naming the parameter. Nothing is silently dropped: an unknown parameter is an error.

Names (OpenAI / vLLM first, then edgeroute's): ``max_tokens`` / ``max_completion_tokens`` / ``max_new_tokens``,
``min_tokens`` / ``min_new_tokens``, ``stop`` (a string or a list), ``stop_token_ids``, ``temperature``, ``top_p``,
``top_k`` (vLLM's ``-1`` = off, like 0), ``min_p``, ``typical_p``, ``min_keep``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty``, ``penalty_last_n``, ``logit_bias`` (token ids as ints or as the strings
JSON object keys are), ``seed``, ``logprobs`` (a bool with ``top_logprobs``, as in chat completions, or an int, as
in completions), ``explore``, ``explore_end``, ``explore_steps``, ``explore_schedule``, ``prefill_chunk``;
structured output (at most one): ``constraint`` (a :class:`~edgeroute.Constraint`), ``schema`` (a JSON Schema, as a
mapping or JSON text; vLLM's ``guided_json``), ``regex`` (``guided_regex``), ``grammar`` (Lark; ``guided_grammar``)
with ``grammar_syntax`` (``"lark"`` or ``"gbnf"``) and, for a schema, ``whitespace`` (``"spaced"``, ``"compact"``,
``"flexible"``); flows: ``draft`` (``"ngram"`` or a model), ``draft_k`` (an int or ``"auto"``), ``adaptive_k``,
``guidance``, ``negative_prompt``, ``contrast`` (a model), ``contrast_alpha``, ``contrast_beta``, and their gate
``gate_threshold`` (``"inf"``/``"-inf"`` as strings too, since JSON has no infinity), ``gate_signal`` and
``gate_width``. A model may be given by name when ``load`` resolves names to models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .config import GenerationConfig, SamplingConfig, is_number
from .constraint import Constraint, Grammar, JsonSchema, Regex
from .errors import ConfigError

if TYPE_CHECKING:
    from .graph import Graph

GATE_SIGNALS = ("margin", "entropy")  # what the gate reads (routing.gate_signal)
GUIDANCE_LIMIT = 100.0  # |w| beyond this scales the logit difference past anything useful, towards float32 overflow


@dataclass(frozen=True)
class Flows:
    """Level-1 routing of one request (docs/router.md, "Two-level routing"): at most one kind.

    Args:
        draft: a second model with the same tokenizer, or ``"ngram"`` (prompt lookup): speculative decoding with
            ``draft_k`` proposals per round (``adaptive_k`` adapts k to the acceptance).
        guidance: the weight w of classifier-free guidance against ``negative_prompt`` (text or ids; default: an
            empty context, the BOS token), in [-100, 100]; ``w = 1`` is exactly single-stream generation.
        contrast: a smaller model for contrastive decoding with weight ``contrast_alpha`` (in [0, 10]) over the
            plausible set ``p >= contrast_beta * p_max`` (``contrast_beta`` in (0, 1]).
        gate_threshold: for guidance and contrast, the gate θ (docs/router.md): at each step a signal g of the
            first flow's own distribution decides; ``g > θ`` mixes the second flow in, otherwise the first flow is
            used alone and the second is not run. ``None`` (default) or ``-inf`` mixes at every step, ``+inf``
            never does.
        gate_signal: ``"margin"`` (default): g = 1 - (p1 - p2), in [0, 1]; ``"entropy"``: g = the entropy in nats.
        gate_width: a soft gate: the mix weight (``w - 1`` of guidance, ``alpha`` of contrast) is scaled by a ramp
            from 0 at ``g = θ - width/2`` to 1 at ``g = θ + width/2``; ``0`` (default) is the hard gate.

    What needs the target model (a shared tokenizer, a negative prompt that fits) is checked by the Generator.
    """

    draft: Graph | str | None = None
    draft_k: int = 4
    adaptive_k: bool = False
    guidance: float | None = None
    negative_prompt: str | Sequence[int] | None = None
    contrast: Graph | None = None
    contrast_alpha: float = 0.5
    contrast_beta: float = 0.1
    gate_threshold: float | None = None
    gate_width: float = 0.0
    gate_signal: str = "margin"

    def __post_init__(self) -> None:
        if isinstance(self.draft, str) and self.draft != "ngram":
            raise ConfigError("draft", self.draft, "must be a Model or 'ngram'")
        k = self.draft_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError("draft_k", k, "must be an integer >= 1")
        if not isinstance(self.adaptive_k, bool):
            raise ConfigError("adaptive_k", self.adaptive_k, "must be true or false")
        w = self.guidance
        if w is not None:
            if not is_number(w) or not -GUIDANCE_LIMIT <= w <= GUIDANCE_LIMIT:
                raise ConfigError("guidance", w, f"must be in [-{GUIDANCE_LIMIT:g}, {GUIDANCE_LIMIT:g}] (1 = off)")
            object.__setattr__(self, "guidance", float(w))
        elif self.negative_prompt is not None:
            raise ConfigError("negative_prompt", self.negative_prompt, "needs guidance (a weight w)")
        a, b = self.contrast_alpha, self.contrast_beta
        if not (is_number(a) and 0 <= a <= 10):
            raise ConfigError("contrast_alpha", a, "must be a number in [0, 10]")
        if not (is_number(b) and 0 < b <= 1):
            raise ConfigError("contrast_beta", b, "must be in (0, 1]")
        kinds = [name for name, on in self._kinds().items() if on]
        if len(kinds) > 1:
            raise ConfigError("flows", "/".join(kinds), "use one of speculative decoding, guidance or contrast")
        self._check_gate()

    def _check_gate(self) -> None:
        theta, width = self.gate_threshold, self.gate_width
        if theta is not None:
            if not isinstance(theta, (int, float)) or isinstance(theta, bool) or math.isnan(theta):
                raise ConfigError("gate_threshold", theta, "must be a number (-inf = always mix, inf = never)")
            if self.guidance is None and self.contrast is None:
                raise ConfigError("gate_threshold", theta, "needs guidance or contrast (a second flow to gate)")
            object.__setattr__(self, "gate_threshold", float(theta))
        if not (is_number(width) and width >= 0):
            raise ConfigError("gate_width", width, "must be a number >= 0 (0 = a hard gate)")
        if width and theta is None:
            raise ConfigError("gate_width", width, "needs gate_threshold")
        object.__setattr__(self, "gate_width", float(width))
        if self.gate_signal not in GATE_SIGNALS:
            raise ConfigError("gate_signal", self.gate_signal, "must be 'margin' or 'entropy'")

    def _kinds(self) -> dict[str, bool]:
        return {
            "draft": self.draft is not None,
            "guidance": self.guidance is not None,
            "contrast": self.contrast is not None,
        }

    @property
    def active(self) -> bool:
        """True when a second flow is in use."""
        return any(self._kinds().values())


_ALIASES = {  # OpenAI/vLLM name -> edgeroute's
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "guided_json": "schema",
    "guided_regex": "regex",
    "guided_grammar": "grammar",
}
_CONSTRAINTS = ("constraint", "schema", "regex", "grammar")
_SAMPLING = {f.name for f in fields(SamplingConfig)}
_GENERATION = {
    "max_new_tokens",
    "min_new_tokens",
    "stop",
    "stop_token_ids",
    "prefill_chunk",
    "think_first",
    "prompt_logprobs",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "adapter",
}
_FLOWS = {f.name for f in fields(Flows)}
_CONSTRAINT_OPTIONS = ("grammar_syntax", "whitespace")
PARAMETERS = frozenset(
    _SAMPLING
    | _GENERATION
    | _FLOWS
    | set(_ALIASES)
    | {"logprobs", "top_logprobs"}
    | set(_CONSTRAINTS)
    | set(_CONSTRAINT_OPTIONS)
)


def flows_of(flows: Flows | None, fields: dict[str, Any]) -> Flows:
    """A :class:`Flows`, or one built from its fields given by keyword (not both); ``ConfigError`` otherwise."""
    if fields:
        if flows is not None:
            raise ConfigError("flows", sorted(fields), "give a Flows or its fields, not both")
        unknown = sorted(set(fields) - set(Flows.__dataclass_fields__))
        if unknown:
            raise ConfigError(unknown[0], fields[unknown[0]], "is not a flow setting")
        flows = Flows(**fields)
    flows = flows or Flows()
    if not isinstance(flows, Flows):
        raise ConfigError("flows", flows, "must be a Flows")
    return flows


def from_params(
    params: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    load: Callable[[str], Graph] | None = None,
) -> tuple[GenerationConfig, Flows]:
    """The configs of one request: ``params`` (plain values; ``None`` means "not given") over ``defaults`` (a
    model's ``manifest.generation_defaults``), then edgeroute's defaults.

    Args:
        params: parameter name -> value, by the names in the module docstring.
        defaults: generation defaults that ``params`` override.
        load: resolves a model given by name (``draft``, ``contrast``) to a Model; without it a name is an error.

    Raises:
        ConfigError: naming the parameter (as given) for an unknown one, a bad value, or two names of one setting
            with different values (``max_tokens`` and ``max_new_tokens``).
    """
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - PARAMETERS)
    if unknown:
        raise ConfigError(unknown[0], given[unknown[0]], "is not a generation parameter")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, value in given.items():
        key = _ALIASES.get(name, name)
        if key in merged and merged[key] != value:
            raise ConfigError(name, value, f"conflicts with {origin[key]}={merged[key]!r}")
        merged[key], origin[key] = value, name
    try:
        return _generation(merged, dict(defaults or {})), _flows(merged, load)
    except ConfigError as e:  # name the parameter as the request spelled it
        if e.field in origin and origin[e.field] != e.field:
            raise ConfigError(origin[e.field], e.value, e.reason) from None
        raise


def _generation(p: dict[str, Any], defaults: dict[str, Any]) -> GenerationConfig:
    sampling = {k: v for k, v in defaults.items() if k in _SAMPLING}
    sampling.update((k, v) for k, v in p.items() if k in _SAMPLING)
    if sampling.get("top_k") == -1:  # vLLM's "off"
        sampling["top_k"] = 0
    if "logit_bias" in sampling:
        sampling["logit_bias"] = _bias(sampling["logit_bias"])
    gen = {k: v for k, v in defaults.items() if k in _GENERATION}
    gen.update((k, v) for k, v in p.items() if k in _GENERATION)
    if isinstance(gen.get("stop"), list):
        gen["stop"] = tuple(gen["stop"])
    if isinstance(gen.get("stop_token_ids"), list):
        gen["stop_token_ids"] = tuple(gen["stop_token_ids"])
    logprobs = _logprobs(p.get("logprobs"), p.get("top_logprobs"))
    if logprobs is not None:
        gen["logprobs"] = logprobs
    constraint = _constraint(p)
    if constraint is not None:
        gen["constraint"] = constraint
    return GenerationConfig(sampling=SamplingConfig(**sampling), **gen)


def _constraint(p: dict[str, Any]) -> Constraint | None:
    """At most one of ``constraint``, ``schema``, ``regex``, ``grammar`` -> a Constraint (options checked)."""
    given = [k for k in _CONSTRAINTS if k in p]
    if len(given) > 1:
        raise ConfigError(given[1], p[given[1]], f"conflicts with {given[0]}: give one constraint")
    syntax, whitespace = p.get("grammar_syntax"), p.get("whitespace")
    kind = given[0] if given else None
    if syntax is not None and kind != "grammar":
        raise ConfigError("grammar_syntax", syntax, "needs grammar")
    if whitespace is not None and kind != "schema":
        raise ConfigError("whitespace", whitespace, "needs schema")
    if kind is None:
        return None
    value = p[kind]
    if kind == "constraint":
        if not isinstance(value, Constraint):
            raise ConfigError("constraint", value, "must be a JsonSchema, JsonObject, Regex or Grammar")
        return value
    if kind == "schema":
        return JsonSchema(value, whitespace if whitespace is not None else "spaced")
    if not isinstance(value, str):
        raise ConfigError(kind, value, "must be a string")
    return Regex(value) if kind == "regex" else Grammar(value, syntax if syntax is not None else "lark")


def _bias(bias: Any) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token ids as ints, or as the strings JSON object keys are."""
    if not isinstance(bias, Mapping):
        raise ConfigError("logit_bias", bias, "must map token ids to biases")
    out: dict[int, float] = {}
    for k, v in bias.items():
        key = _digits(k) if isinstance(k, str) else k
        if key is None:
            raise ConfigError("logit_bias", {k: v}, "keys must be token ids (integers >= 0)")
        out[key] = v
    return out


def _digits(text: str) -> int | None:
    """An integer >= 0 written in ASCII digits (``"²"`` and ``"٣"`` are digits to ``str.isdigit``, not to JSON), at
    most 18 of them (an int64), else None."""
    text = text.strip()
    if not 0 < len(text) <= 18 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _logprobs(logprobs: Any, top: Any) -> bool | int | None:
    """Chat completions' ``logprobs: bool`` + ``top_logprobs: int``, or completions' ``logprobs: int``."""
    if top is not None:
        if logprobs is False:
            raise ConfigError("top_logprobs", top, "needs logprobs: true")
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise ConfigError("top_logprobs", top, "must be an integer in [0, 20]")
        return top if top > 0 else True
    if logprobs is None or isinstance(logprobs, bool):
        return logprobs
    if isinstance(logprobs, int):
        if not 0 <= logprobs <= 20:
            raise ConfigError("logprobs", logprobs, "must be a bool or an integer in [0, 20]")
        return logprobs if logprobs > 0 else True
    raise ConfigError("logprobs", logprobs, "must be a bool or an integer in [0, 20]")


def _flows(p: dict[str, Any], load: Callable[[str], Graph] | None) -> Flows:
    kw = {k: v for k, v in p.items() if k in _FLOWS}
    if kw.get("draft_k") == "auto":
        kw["draft_k"], kw["adaptive_k"] = 4, True
    elif isinstance(kw.get("draft_k"), str):
        k = _digits(kw["draft_k"])
        if k is None:
            raise ConfigError("draft_k", kw["draft_k"], "must be a positive integer or 'auto'")
        kw["draft_k"] = k
    theta = kw.get("gate_threshold")
    if isinstance(theta, str):  # JSON has no infinity: "inf" / "-inf" (or any number) as a string
        try:
            kw["gate_threshold"] = float(theta)
        except ValueError:
            raise ConfigError("gate_threshold", theta, "must be a number, 'inf' or '-inf'") from None
    for name in ("draft", "contrast"):
        value = kw.get(name)
        if isinstance(value, str) and not (name == "draft" and value == "ngram"):
            if load is None:
                raise ConfigError(name, value, "names a model, and this request cannot load one")
            kw[name] = load(value)
    return Flows(**kw)
