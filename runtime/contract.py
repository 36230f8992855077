"""The graph contract between the export and the runtime, defined once.

A model folder's graph is described by a :class:`GraphContract`: the graph names of its *logical* inputs and
outputs (:class:`Name`), the form of its logits, its KV layout and geometry. The export builds one for the graph it
writes (``export/fused.py``, ``export/graph.py``) and stores it in ``edgeroute.json``; the runtime reads it back
(``Manifest.contract``), checks a session against it (:meth:`GraphContract.check_session`) and builds every run's
inputs with :meth:`GraphContract.feeds` (the KV caches, the export's calibration and tests). ``SharedBinding`` in
``kv_cache.py`` binds the same inputs once and updates them in place (the decode loop's fast path; a test pins it
to :meth:`feeds`).

Two KV layouts:

- ``concat``: the graph takes the past (``length`` positions) with an ``attention_mask`` over ``length + n`` and
  optional ``position_ids``, and returns the present (``length + n`` positions): rows may be left-padded;
- ``shared``: past and present are one buffer per layer of the runtime's context cap, bound to both the input and
  the output and written in place; the graph takes int32 ``seqlens_k`` (each row's total length - 1) and an int32
  scalar ``total_sequence_length`` (onnxruntime's GroupQueryAttention contract) instead of a mask. Graphs exported
  since wave 3 also take int32 ``query_seqlens`` (each row's count of valid, right-padded positions in this run):
  rows of a batch may then append different numbers of positions after different pasts in one run (an item's
  continuations scored after one shared context); older exports lack it and run rows of equal counts only.

Logits: ``all`` (one row per input position), ``last`` (the last position only) or ``keep`` (an int64
``logits_to_keep`` input of shape [1]: that many last positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelLoadError


class Name:
    """Logical names of the graph's inputs and outputs (the keys of ``inputs``/``outputs`` in the manifest)."""

    INPUT_IDS = "input_ids"
    ATTENTION_MASK = "attention_mask"
    POSITION_IDS = "position_ids"
    SEQLENS_K = "seqlens_k"
    TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
    QUERY_SEQLENS = "query_seqlens"
    LOGITS_TO_KEEP = "logits_to_keep"
    PAST_KEY = "past_key"
    PAST_VALUE = "past_value"
    LOGITS = "logits"
    PRESENT_KEY = "present_key"
    PRESENT_VALUE = "present_value"


LAYER = "{layer}"
KV_LAYOUTS = ("concat", "shared")
KV_DTYPES = ("float32", "float16")
LOGITS_FORMS = ("all", "last", "keep")
SHARED_INPUTS = (Name.SEQLENS_K, Name.TOTAL_SEQUENCE_LENGTH, Name.LOGITS_TO_KEEP)
OPTIONAL_INPUTS = (Name.ATTENTION_MASK, Name.POSITION_IDS, *SHARED_INPUTS, Name.QUERY_SEQLENS)

DEFAULT_INPUTS: dict[str, str | None] = {
    Name.INPUT_IDS: "input_ids",
    Name.ATTENTION_MASK: "attention_mask",
    Name.POSITION_IDS: "position_ids",
    Name.PAST_KEY: "past_key_values.{layer}.key",
    Name.PAST_VALUE: "past_key_values.{layer}.value",
}
DEFAULT_OUTPUTS: dict[str, str] = {
    Name.LOGITS: "logits",
    Name.PRESENT_KEY: "present.{layer}.key",
    Name.PRESENT_VALUE: "present.{layer}.value",
}
# the graph names edgeroute's exports give the inputs of the shared layout
SHARED_GRAPH_INPUTS: dict[str, str | None] = {
    **DEFAULT_INPUTS,
    Name.ATTENTION_MASK: None,
    Name.POSITION_IDS: None,
    **{n: n for n in (*SHARED_INPUTS, Name.QUERY_SEQLENS)},
}

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
# the manifest fields a contract is made of
FIELDS = ("inputs", "outputs", "logits", "kv_layout", "num_layers", "num_kv_heads", "head_size", "kv_dtype",
          "vocab_size", "lora")  # fmt: skip
LORA_INPUT = "lora.{layer}.{projection}.{side}"  # a LoRA graph's per-row adapter weights (side A: [batch, in, rank])


@dataclass(frozen=True)
class GraphContract:
    """What a graph takes and returns. ``inputs``/``outputs`` map logical names (:class:`Name`) to graph names;
    the past and present names are patterns with ``{layer}``. ``vocab_size`` may be None while exporting (the
    checkpoint's config then gives it)."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int | None
    inputs: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_INPUTS))
    outputs: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_OUTPUTS))
    logits: str = "all"
    kv_layout: str = "concat"
    kv_dtype: str = "float32"
    lora: Mapping[str, Any] | None = None  # the graph's adapter inputs (``edgeroute.adapters.LoraLayout``)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> GraphContract:
        """The contract within a manifest's fields (extra fields are ignored)."""
        return cls(**{k: fields[k] for k in FIELDS if k in fields})

    def to_fields(self) -> dict[str, Any]:
        """The manifest fields of this contract."""
        fields = {k: dict(v) if isinstance(v, Mapping) else v for k in FIELDS for v in [getattr(self, k)]}
        if fields["lora"] is None:
            del fields["lora"]
        return fields

    # -- names -----------------------------------------------------------------------------------------------
    @property
    def ragged(self) -> bool:
        """Whether the graph takes ``query_seqlens``: rows of one run may append different numbers of positions
        after different pasts (right-padded)."""
        return bool(self.inputs.get(Name.QUERY_SEQLENS))

    def name(self, logical: str) -> str | None:
        """The graph name of a logical input (None: the graph has no such input)."""
        return self.inputs.get(logical)

    def past_names(self) -> list[tuple[str, str]]:
        """Graph input names ``(key, value)`` for every layer."""
        k, v = self.inputs[Name.PAST_KEY], self.inputs[Name.PAST_VALUE]
        assert k is not None and v is not None
        return [(k.format(layer=i), v.format(layer=i)) for i in range(self.num_layers)]

    def present_names(self) -> list[tuple[str, str]]:
        """Graph output names ``(key, value)`` for every layer."""
        k, v = self.outputs[Name.PRESENT_KEY], self.outputs[Name.PRESENT_VALUE]
        return [(k.format(layer=i), v.format(layer=i)) for i in range(self.num_layers)]

    def input_names(self) -> list[str]:
        """Every graph input this contract feeds: ids, the optional inputs it names, the past."""
        names = [str(self.inputs[Name.INPUT_IDS])]
        names += [str(self.inputs[n]) for n in OPTIONAL_INPUTS if self.inputs.get(n)]
        return names + [n for pair in self.past_names() for n in pair] + [name for name, _ in self.lora_inputs()]

    def lora_inputs(self) -> list[tuple[str, tuple[int, int]]]:
        """A LoRA graph's adapter inputs: ``(name, (rows, columns))`` of each per-row weight, every layer's
        projections in order (A ``[in, rank]`` then B ``[rank, out]``); empty for other graphs."""
        if not self.lora:
            return []
        out = []
        for layer in range(self.num_layers):
            for proj, p in self.lora["projections"].items():
                rank = int(self.lora["rank"]) * len(p["subs"])
                for side, shape in (("A", (p["in"], rank)), ("B", (rank, p["out"]))):
                    out.append((LORA_INPUT.format(layer=layer, projection=proj, side=side), shape))
        return out

    def output_names(self) -> list[str]:
        """The logits, then every layer's present key and value."""
        return [self.outputs[Name.LOGITS], *(n for pair in self.present_names() for n in pair)]

    # -- inputs ----------------------------------------------------------------------------------------------
    def feeds(
        self,
        ids: np.ndarray,
        past: Sequence[tuple[np.ndarray, np.ndarray]],
        n_last: int,
        past_length: int | np.ndarray = 0,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The inputs of one run of ``ids [batch, n]`` after ``past_length`` cached positions (shared layout: an
        int per row allowed), with ``past`` every layer's (key, value) and ``n_last`` positions of logits kept.

        Concat: ``attention_mask`` defaults to ones over ``past_length + n`` and ``position_ids`` to the
        positions after the past. Shared: ``seqlens_k = past_length + n - 1`` per row and
        ``total_sequence_length`` the longest row's total (mask and positions are not inputs); with
        ``query_seqlens``, ``counts`` (default ``n``) valid positions per row, the rest right padding."""
        b, n = ids.shape
        feeds: dict[str, np.ndarray] = {str(self.inputs[Name.INPUT_IDS]): np.ascontiguousarray(ids, dtype=np.int64)}
        if self.kv_layout == "shared":
            lengths = np.broadcast_to(np.asarray(past_length, dtype=np.int64), (b,))
            valid = np.full(b, n, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
            feeds[str(self.inputs[Name.SEQLENS_K])] = (lengths + valid - 1).astype(np.int32)
            total = int(lengths.max()) + n if counts is None else int((lengths + valid).max())
            feeds[str(self.inputs[Name.TOTAL_SEQUENCE_LENGTH])] = np.array(total, dtype=np.int32)
            query = self.inputs.get(Name.QUERY_SEQLENS)
            if query:
                feeds[query] = valid.astype(np.int32)
        else:
            past_n = int(np.max(past_length))
            if attention_mask is None:
                attention_mask = np.ones((b, past_n + n), dtype=np.int64)
            feeds[str(self.inputs[Name.ATTENTION_MASK])] = attention_mask
            pos = self.inputs.get(Name.POSITION_IDS)
            if pos:
                if position_ids is None:
                    position_ids = np.broadcast_to(np.arange(past_n, past_n + n, dtype=np.int64), (b, n))
                feeds[pos] = np.ascontiguousarray(position_ids, dtype=np.int64)
        keep = self.inputs.get(Name.LOGITS_TO_KEEP)
        if keep and self.logits == "keep":
            feeds[keep] = np.array([n_last], dtype=np.int64)
        for (kn, vn), (k, v) in zip(self.past_names(), past, strict=True):
            feeds[kn] = k
            feeds[vn] = v
        for name, shape in self.lora_inputs():  # no adapter: the LoRA graph's deltas are zero
            feeds[name] = np.zeros((b, *shape), np.float32)
        return feeds

    def empty_past(self, batch: int = 1, length: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Zero past buffers ``[batch, kv_heads, length, head_size]`` for every layer (an empty concat cache, or a
        shared buffer of ``length`` positions)."""
        shape = (batch, self.num_kv_heads, length, self.head_size)
        dtype = np.dtype(self.kv_dtype)
        return [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(self.num_layers)]

    # -- checking a graph ------------------------------------------------------------------------------------
    def check_session(self, session: Any) -> None:
        """Raise ``ModelLoadError`` when an onnxruntime session's inputs/outputs do not match this contract."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        want_in = self.input_names()
        missing = [n for n in want_in if n not in inputs]
        extra = sorted(set(inputs) - set(want_in))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing inputs {missing[:4]}{'...' if len(missing) > 4 else ''}")
            if extra:
                parts.append(f"undescribed inputs {extra[:4]}{'...' if len(extra) > 4 else ''}")
            raise ModelLoadError(f"graph does not match its manifest: {'; '.join(parts)}")
        missing_out = [n for n in self.output_names() if n not in outputs]
        if missing_out:
            raise ModelLoadError(f"graph does not match its manifest: missing outputs {missing_out[:4]}")
        want_type = _ORT_TYPES[self.kv_dtype]
        for name in (n for p in self.past_names() for n in p):
            meta = inputs[name]
            if meta.type != want_type:
                raise ModelLoadError(f"graph input {name} is {meta.type}, manifest says kv_dtype {self.kv_dtype}")
            shape = list(meta.shape)
            if len(shape) != 4:
                raise ModelLoadError(f"graph input {name} has rank {len(shape)}, expected 4 (batch, heads, len, dim)")
            for got, want, what in (
                (shape[1], self.num_kv_heads, "num_kv_heads"),
                (shape[3], self.head_size, "head_size"),
            ):
                if isinstance(got, int) and got != want:
                    raise ModelLoadError(f"graph input {name} has {got} for {what}, manifest says {want}")
        logits_meta = next(o for o in session.get_outputs() if o.name == self.outputs[Name.LOGITS])
        last = logits_meta.shape[-1] if logits_meta.shape else None
        if isinstance(last, int) and self.vocab_size is not None and last != self.vocab_size:
            raise ModelLoadError(f"graph logits have {last} entries, manifest says vocab_size {self.vocab_size}")
