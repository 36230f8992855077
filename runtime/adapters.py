"""LoRA adapters at run time: many fine-tunes over one base graph, chosen per request, mixed in one batch.

A graph exported with ``--lora-rank R`` (``export/fused.py``) computes, for every projection an adapter may change,
``y = x·W + (x·A)·B`` where ``A`` ``[batch, in, rank]`` and ``B`` ``[batch, rank, out]`` are graph *inputs*, one
matrix per row of the batch. A row without an adapter has zeros there (its output is the base model's, exactly); a
row with one has that adapter's weights, so one graph run decodes rows on different adapters, each with its own.
The per-row weights live beside the KV cache (:class:`LoraRows`, in ``SharedKVCache``): choosing a row's adapter
copies its weights into the row once, when a request starts on it; the decode steps then bind nothing new.

Packed projections take several modules at once: ``qkv_proj`` is ``q_proj|k_proj|v_proj`` (one input ``x``), so its
``A`` is the modules' ``A`` side by side (``R`` columns each) and its ``B`` block-diagonal (each module's rows write
only its own output columns); ``gate_up_proj`` likewise. The manifest's ``lora`` field (:class:`LoraLayout`) says
which modules each projection packs, where their outputs lie and the rank ``R`` each module may use.

An :class:`Adapter` is one PEFT LoRA adapter read into float32 ``A`` ``[in, r]`` and ``B`` ``[r, out]`` per
(layer, module), its scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) folded into ``B``. It is read from
a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) or from edgeroute's own adapter file (the same
tensors, scaled, in one safetensors file: ``write_adapter``), and checked against the layout when loaded: a module
the graph cannot change, a rank above ``R``, a shape of another model, DoRA, biases or ``modules_to_save`` are
refused then, with an :class:`AdapterError` naming the problem, never at the first token.

:class:`AdapterSet` (``Model.adapters``) holds the loaded adapters by name (thread-safe; at most ``max_adapters``).
Unloading removes the name at once; requests already running keep what their rows hold (a copy), and every load
gets a new ``uid``, which is what the engine's prefix reuse compares: a cached prefix is only ever reused by a
request on the same load of the same adapter (or on none).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from . import safetensors_io
from .contract import GraphContract
from .errors import AdapterError, ConfigError
from .lazy_memory import lazy_arrays

ADAPTER_FORMAT = "edgeroute-lora"
DEFAULT_MAX_ADAPTERS = 16
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]*")
_PATH_CHARS = set(":@/")  # allowed in a served adapter's name, not in a file's
# PEFT's tensor names: ...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_OWN_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.([AB])$")
_uids = count(1)


class LoraLayout:
    """The manifest's ``lora`` field read: which module goes where in which projection's inputs."""

    def __init__(self, contract: GraphContract) -> None:
        lora = contract.lora
        assert lora is not None
        self.contract = contract
        self.rank = int(lora["rank"])
        self.targets = tuple(lora["targets"])
        self.projections = list(lora["projections"])
        self.num_layers = contract.num_layers
        # module -> (projection index, column block, input width, output offset, output width)
        self.where: dict[str, tuple[int, int, int, int, int]] = {}
        for p, proj in enumerate(lora["projections"].values()):
            for j, (module, offset, width) in enumerate(proj["subs"]):
                self.where[module] = (p, j, int(proj["in"]), int(offset), int(width))
        self.inputs = contract.lora_inputs()

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`AdapterError` when ``adapter`` does not fit this graph (names the first misfit)."""
        for (layer, module), (a, b) in adapter.weights.items():
            where = f"adapter {adapter.name!r}: layer {layer} {module}"
            if module not in self.where:
                raise AdapterError(
                    f"{where}: this model's graph takes adapters on {', '.join(self.targets)} only"
                    " (export the base with --lora-targets naming it)"
                )
            if layer >= self.num_layers:
                raise AdapterError(f"{where}: the model has {self.num_layers} layers: an adapter of another base")
            _, _, width_in, _, width_out = self.where[module]
            r = a.shape[1]
            if r > self.rank:
                raise AdapterError(f"{where}: rank {r} is above the graph's {self.rank} (export with --lora-rank {r})")
            if a.shape != (width_in, r) or b.shape != (r, width_out):
                raise AdapterError(
                    f"{where}: shapes A {list(a.shape)} B {list(b.shape)} do not fit the model's {width_in} -> "
                    f"{width_out}: an adapter of another base"
                )

    def fill(self, buffers: list[np.ndarray], row: int, adapter: Adapter, clear: bool = False) -> None:
        """Write ``adapter``'s weights into row ``row`` of ``buffers`` (``clear``: zeros where they go)."""
        per_layer = len(self.projections)
        for (layer, module), (a, b) in adapter.weights.items():
            p, j, _, offset, width = self.where[module]
            i = 2 * (layer * per_layer + p)
            c, r = j * self.rank, a.shape[1]
            buffers[i][row, :, c : c + r] = 0 if clear else a
            buffers[i + 1][row, c : c + r, offset : offset + width] = 0 if clear else b


class Adapter:
    """One loaded LoRA adapter: ``weights[(layer, module)] = (A [in, r], B [r, out])`` float32, scaling folded into
    ``B``. ``uid`` is unique per load (prefix reuse compares it)."""

    def __init__(self, name: str, weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], info: dict[str, Any]):
        self.name = name
        self.weights = weights
        self.info = info  # rank, alpha, modules, source
        self.uid = next(_uids)
        #: a hash of the weights, computed at load (what a prefix cache keys positions computed on it by)
        self.digest = _digest(weights)

    @property
    def rank(self) -> int:
        return max((a.shape[1] for a, _ in self.weights.values()), default=0)

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.weights})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, rank={self.rank}, modules={self.modules}, uid={self.uid})"


def prefix_key(adapter: Adapter | None) -> bytes:
    """What the prefix cache keys positions computed on ``adapter`` by: its weights' digest (``b""``: the base)."""
    return adapter.digest if adapter is not None else b""


def _digest(weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for (layer, module), (a, b) in sorted(weights.items()):
        h.update(f"{layer}.{module}".encode())
        h.update(a.tobytes())
        h.update(b.tobytes())
    return h.digest()


def check_name(name: Any, field: str = "name") -> str:
    """An adapter name: 1 to 128 letters, digits and ``._:@/-``, starting with a letter or digit."""
    if not _named(name):
        raise ConfigError(field, name, f"must be 1 to {MAX_NAME} letters, digits and ._:@/- (an adapter name)")
    return name


def _named(name: Any) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None


def read_adapter(path: str | Path, name: str) -> Adapter:
    """Read a PEFT LoRA folder or an edgeroute adapter file (:func:`write_adapter`); :class:`AdapterError` when it
    cannot be read or uses what edgeroute does not run."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_peft(p, name)
    if not p.is_file():
        raise AdapterError(f"adapter {name!r}: {p} is neither a PEFT adapter folder nor an adapter file")
    try:
        tensors, meta = safetensors_io.read(p)
    except (ValueError, OSError) as e:
        raise AdapterError(f"adapter {name!r}: {p} is not a readable safetensors file: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"adapter {name!r}: {p} is not an edgeroute adapter file (give a PEFT folder, or convert it with"
            " `edgeroute adapter add`)"
        )
    weights: dict[tuple[int, str], list[np.ndarray | None]] = {}
    for key, arr in tensors.items():
        m = _OWN_KEY.match(key)
        if m is None or arr.ndim != 2:
            raise AdapterError(f"adapter {name!r}: {p} has an unexpected tensor {key!r}")
        weights.setdefault((int(m[1]), m[2]), [None, None])["AB".index(m[3])] = arr
    info: dict[str, Any] = {k: meta[k] for k in ("rank", "alpha", "rslora", "source") if k in meta}
    return Adapter(name, _pairs(name, weights), info)


def _read_peft(folder: Path, name: str) -> Adapter:
    cfg_path, st = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {cfg_path} cannot be read: {e}") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    refused = {
        "use_dora": "DoRA (use_dora)",
        "modules_to_save": "modules_to_save (fully trained layers)",
        "alpha_pattern": "alpha_pattern",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D models)",
        "target_parameters": "target_parameters",
    }
    for key, what in refused.items():
        if cfg.get(key):
            raise AdapterError(f"adapter {name!r}: {what} is not supported at run time (merge it: export SOURCE)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: LoRA biases (bias={cfg['bias']!r}) are not supported at run time")
    if not st.is_file():
        hint = (
            " (adapter_model.bin: save it with safe_serialization=True)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"adapter {name!r}: {st} is missing{hint}")
    try:
        tensors, _ = safetensors_io.read(st)
    except (ValueError, OSError) as e:
        raise AdapterError(f"adapter {name!r}: {st} is not a readable safetensors file: {e}") from None
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha):
        raise AdapterError(f"adapter {name!r}: lora_alpha {alpha!r} is not a number")
    rslora = bool(cfg.get("use_rslora", False))
    weights: dict[tuple[int, str], list[np.ndarray | None]] = {}
    for key, arr in tensors.items():
        m = _PEFT_KEY.search(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a layer's projection")
        if arr.ndim != 2:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has shape {list(arr.shape)}, expected a matrix")
        side = "AB".index(m[3])  # PEFT: A [r, in], B [out, r]
        weights.setdefault((int(m[1]), m[2]), [None, None])[side] = arr.T
    pairs = _pairs(name, weights)
    for where, (a, b) in pairs.items():
        r = a.shape[1]
        scale = alpha / (np.sqrt(r) if rslora else r)
        pairs[where] = (a, np.ascontiguousarray(b * np.float32(scale), dtype=np.float32))
    info = {"rank": str(max(a.shape[1] for a, _ in pairs.values())), "alpha": str(alpha), "rslora": str(rslora)}
    info["source"] = str(cfg.get("base_model_name_or_path") or "")
    return Adapter(name, pairs, info)


def _pairs(
    name: str, weights: dict[tuple[int, str], list[np.ndarray | None]]
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Each (layer, module)'s ``(A [in, r], B [r, out])``, checked complete and consistent."""
    if not weights:
        raise AdapterError(f"adapter {name!r}: no LoRA weights in it")
    out = {}
    for (layer, module), (a, b) in sorted(weights.items()):
        if a is None or b is None:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has {'B' if a is None else 'A'} alone")
        if a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module}: A {list(a.shape)} and B {list(b.shape)} disagree on rank"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has weights that are not finite")
        out[(layer, module)] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    return out


def write_adapter(adapter: Adapter, path: str | Path) -> None:
    """Write ``adapter`` as edgeroute's adapter file (scaled weights, one safetensors file)."""
    tensors = {}
    for (layer, module), (a, b) in adapter.weights.items():
        tensors[f"layers.{layer}.{module}.A"] = a
        tensors[f"layers.{layer}.{module}.B"] = b
    meta = {"format": ADAPTER_FORMAT, **{k: str(v) for k, v in adapter.info.items()}}
    meta["modules"] = ",".join(adapter.modules)
    safetensors_io.write(path, tensors, meta)


class LoraRows:
    """The per-row adapter inputs of one KV cache: one zeroed buffer per LoRA input (``[rows, in, rank]`` or
    ``[rows, rank, out]``, in a lazily committed memory map like the KV buffers) and which adapter each row holds.
    Views (a cache's ``row``/``head``) share the memory and the record of what each row holds."""

    def __init__(self, layout: LoraLayout, buffers: list[np.ndarray], held: np.ndarray) -> None:
        self.layout = layout
        self.buffers = buffers
        self.held = held  # object array: the Adapter each row holds, or None (zeros)

    @classmethod
    def new(cls, layout: LoraLayout, rows: int) -> LoraRows:
        def refuse(size: int, why: str) -> ConfigError:
            return ConfigError("max_batch", rows, f"the adapter rows need {size / 2**30:.1f} GiB: {why}")

        buffers = lazy_arrays([(rows, *shape) for _, shape in layout.inputs], np.dtype(np.float32), refuse)
        return cls(layout, buffers, np.full(rows, None, dtype=object))

    def view(self, first: int, rows: int) -> LoraRows:
        return LoraRows(self.layout, [b[first : first + rows] for b in self.buffers], self.held[first : first + rows])

    def copy(self) -> LoraRows:
        other = LoraRows.new(self.layout, len(self.held))
        for row, adapter in enumerate(self.held):
            other.set(row, adapter)
        return other

    def set(self, row: int, adapter: Adapter | None) -> None:
        """Row ``row`` runs ``adapter`` (None: the base) from its next graph run on."""
        old = self.held[row]
        if old is adapter:
            return
        if old is not None:
            self.layout.fill(self.buffers, row, old, clear=True)
        if adapter is not None:
            self.layout.fill(self.buffers, row, adapter)
        self.held[row] = adapter


class AdapterSet:
    """The adapters loaded on one model, by name (``Model.adapters``). Thread-safe."""

    def __init__(self, layout: LoraLayout | None, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        if not isinstance(max_adapters, int) or isinstance(max_adapters, bool) or max_adapters < 0:
            raise ConfigError("max_adapters", max_adapters, "must be an integer >= 0")
        self.layout = layout
        self.max_adapters = max_adapters
        self._loaded: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read, check and add the adapter at ``path`` (a PEFT folder or an adapter file) as ``name``."""
        check_name(name)
        if self.layout is None:
            raise AdapterError(
                f"adapter {name!r}: this model's graph takes no adapters: export the base with --lora-rank"
                " (or merge the adapter: edgeroute export ADAPTER_DIR)"
            )
        with self._lock:
            self._room(name)
        adapter = read_adapter(path, name)  # outside the lock: reading takes a while
        self.layout.check(adapter)
        with self._lock:
            self._room(name)
            self._loaded[name] = adapter
        return adapter

    def _room(self, name: str) -> None:
        if name in self._loaded:
            raise AdapterError(f"adapter {name!r} is already loaded (unload it first)")
        if len(self._loaded) >= self.max_adapters:
            raise AdapterError(
                f"adapter {name!r}: {len(self._loaded)} adapters are loaded, the most this model holds"
                f" (max_adapters {self.max_adapters}): unload one first"
            )

    def unload(self, name: str) -> Adapter:
        """Remove ``name``: new requests cannot name it; running ones finish on what their rows hold."""
        with self._lock:
            adapter = self._loaded.pop(name, None)
        if adapter is None:
            raise AdapterError(f"adapter {name!r} is not loaded" + self._known())
        return adapter

    def get(self, name: str | None) -> Adapter | None:
        """The adapter loaded as ``name`` (None: the base); ``ConfigError`` on ``adapter`` when none is."""
        if name is None:
            return None
        with self._lock:
            adapter = self._loaded.get(name)
        if adapter is None:
            raise ConfigError("adapter", name, "is not loaded" + self._known())
        return adapter

    def _known(self) -> str:
        names = sorted(self._loaded)
        return f" (loaded: {', '.join(names[:8])}{'...' if len(names) > 8 else ''})" if names else " (none is loaded)"

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._loaded

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded)

    def __iter__(self) -> Iterator[Adapter]:
        with self._lock:
            return iter([self._loaded[n] for n in sorted(self._loaded)])

    @property
    def nbytes(self) -> int:
        """Bytes the loaded adapters' weights hold."""
        return sum(a.nbytes for a in self)


# -- adapters that come with a model folder (``edgeroute adapter add/remove``, ``export --lora``) -----------------
def check_file_name(name: Any, field: str = "name") -> str:
    """The name of an adapter a model folder keeps: an adapter name (:func:`check_name`) without ``:@/`` (it names
    its file)."""
    if not _named(name) or _PATH_CHARS & set(name):
        raise ConfigError(field, name, f"must be 1 to {MAX_NAME} letters, digits and ._- (it names the adapter's file)")
    return name
