"""A shared KV buffer in onnxruntime's own memory on the session's device (CUDA), bound by address.

:class:`DeviceKVCache` is a :class:`~edgeroute.kv_cache.SharedKVCache` whose buffers (the keys and the values of
each layer) are allocations onnxruntime makes on the device (``OrtValue.ortvalue_from_shape_and_type``) instead of
host NumPy arrays. Each is bound as both the past input and the present output by address, so the graph writes
the new positions in place on the device and nothing of the cache crosses to the host. The small inputs (ids, each row's
length) are device buffers updated by small host-to-device copies; only the logits of the positions asked for
(one row of floats per sequence when decoding) come back to the host for the NumPy router.

Rows are address ranges: a one-row view (``row``) or the first ``k`` rows (``head``) are the same memory bound
with another shape, so the engine's slots and the beams' rows work unchanged. Moving data inside the buffer (beam
search's ``reorder`` and ``widen``, ``copy``) runs a copy graph (``Identity`` nodes over byte ranges) on the same
provider: device-to-device, never through the host.

With ``cuda_graph`` (CUDA only) every decode step (one position per row) runs under onnxruntime's CUDA graph
capture and replay: each binding keeps fixed device buffers for its decode inputs and logits and its own graph id
(a graph replays the addresses it captured, so two caches may never share one), and ``total_sequence_length`` is
held at the buffer's capacity (GroupQueryAttention reads each row's length from ``seqlens_k``; the CPU provider
gives identical logits either way, tested). Prefill chunks (more than one position) run without capture
(``gpu_graph_id = -1``); a batch of another width is another binding, so another graph; rewinding changes only
``seqlens_k``'s contents, so a captured graph stays valid.

The same class runs on the CPU provider over CPU memory allocated by onnxruntime: the tests drive every path of it
there (generation, the engine's batch, beam search, copies) against the host-memory cache.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np

from .errors import ConfigError, first_line
from .kv_cache import SharedKVCache, _inference_error
from .manifest import Manifest

NO_CAPTURE = "-1"  # gpu_graph_id that runs a CUDA-graph-enabled session without capturing


class Device:
    """Where a session's device caches live: allocation, byte copies inside device memory, CUDA graph ids.

    One per ``Model`` (it holds the copy sessions and the counter of graph ids of that model's session), made by
    ``Model.load`` once the provider and ``cuda_graph`` are checked. ``provider`` (``cpu``, ``cuda``) is also
    onnxruntime's device name."""

    def __init__(self, provider: str, cuda_graph: bool = False, device_id: int = 0) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.name = provider
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        # a captured decode graph cannot see a new total_sequence_length: hold it at the capacity (tests set this
        # on the CPU provider to check the tokens do not change)
        self.hold_total = cuda_graph
        self._graph_ids = itertools.count(1)
        self._copiers: dict[int, tuple[Any, Any]] = {}
        self._copy_lock = threading.Lock()  # generators of one model copy from several threads; a binding is one

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new OrtValue of ``shape`` in this device's memory (contents undefined)."""
        try:
            return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, self.name, self.device_id)
        except Exception as e:  # onnxruntime's allocation errors are untyped
            size = int(np.prod(shape)) * dtype.itemsize
            raise ConfigError(
                "context_size", shape, f"cannot allocate {size / 2**30:.2f} GiB on {self.name}: {first_line(e)}"
            ) from None

    def zeros(self, count: int, shape: tuple[int, ...], dtype: np.dtype) -> list[Any]:
        """``count`` zeroed OrtValues of ``shape`` (one host array of zeros serves every copy)."""
        values = [self.allocate(shape, dtype) for _ in range(count)]
        zeros = np.zeros(shape, dtype=dtype)
        for value in values:
            value.update_inplace(zeros)
        return values

    def graph_id(self) -> int:
        """A CUDA graph id no other binding of this session uses."""
        return next(self._graph_ids)

    def copy(self, spans: list[tuple[int, int, int]]) -> None:
        """Copy byte ranges inside device memory: ``(dst_address, src_address, nbytes)`` each, in one graph run.
        Ranges must not overlap (callers stage through a scratch buffer when they would)."""
        if not spans:
            return
        with self._copy_lock:
            session, io = self._copier(len(spans))
            for i, (dst, src, n) in enumerate(spans):
                io.bind_input(f"x{i}", self.name, self.device_id, np.uint8, [n], src)
                io.bind_output(f"y{i}", self.name, self.device_id, np.uint8, [n], dst)
            try:
                session.run_with_iobinding(io)
            except Exception as e:  # onnxruntime's errors are untyped
                raise _inference_error(e) from e

    def _copier(self, width: int) -> tuple[Any, Any]:
        """A session of ``width`` Identity nodes over 1-D byte tensors, on this device's provider."""
        if width not in self._copiers:
            self._copiers[width] = _copy_session(self._ort, width, self.name)
        return self._copiers[width]


def _copy_session(ort: Any, width: int, provider: str) -> tuple[Any, Any]:
    from .session import resolve_provider

    graph = _copy_graph(width)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Identity nodes
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(graph, sess_options=so, providers=[resolve_provider(provider)])
    return session, session.io_binding()


def _copy_graph(width: int) -> bytes:
    """The serialised ONNX graph ``y_i = Identity(x_i)`` for ``width`` uint8 vectors, written by hand (protobuf
    wire format) so the runtime does not need the ``onnx`` package."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(num: int, payload: bytes) -> bytes:  # length-delimited
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    def text(num: int, s: str) -> bytes:
        return field(num, s.encode())

    def value_info(name: str, dim: str) -> bytes:
        shape = field(1, text(2, dim))  # TensorShapeProto.dim { dim_param }
        tensor = varint(1 << 3) + varint(2) + field(2, shape)  # elem_type UINT8 = 2, shape
        return text(1, name) + field(2, field(1, tensor))  # name, type { tensor_type }

    nodes = b"".join(field(1, text(1, f"x{i}") + text(2, f"y{i}") + text(4, "Identity")) for i in range(width))
    inputs = b"".join(field(11, value_info(f"x{i}", f"n{i}")) for i in range(width))
    outputs = b"".join(field(12, value_info(f"y{i}", f"n{i}")) for i in range(width))
    graph = nodes + text(2, "edgeroute_copy") + inputs + outputs
    opset = field(8, text(1, "") + varint(2 << 3) + varint(17))  # opset_import { domain "", version 17 }
    return varint(1 << 3) + varint(8) + field(7, graph) + opset  # ir_version 8, graph, opset


class DeviceKVCache(SharedKVCache):
    """A :class:`SharedKVCache` in device memory (module docstring). ``buffers`` is not available (the memory
    is not host memory): :meth:`host_buffers` copies it out for inspection."""

    ragged = False  # every row runs at the run's width (ragged scoring runs on host caches)

    def __init__(self, manifest: Manifest, capacity: int, batch_size: int, device: Device) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.capacity = capacity
        self.device = device
        self.dtype = np.dtype(manifest.kv_dtype)
        self.layers = 2 * manifest.num_layers
        self.row_shape = (manifest.num_kv_heads, capacity, manifest.head_size)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.first_row = 0  # this view's first row in the allocation
        # one allocation [rows, kv_heads, capacity, head_size] per K and per V of each layer, zeroed as the host
        # cache's memory map is (a position beyond a row's length is never read, but holds no stray bits either)
        self.store = device.zeros(self.layers, (batch_size, *self.row_shape), self.dtype)
        self.bases = [int(v.data_ptr()) for v in self.store]
        self.lengths = np.zeros(batch_size, dtype=np.int32)
        self.binding: Any = None
        self.lora = None  # a LoRA graph takes the host cache (graph._kv_placement)

    @property
    def buffers(self) -> list[np.ndarray]:
        raise AttributeError("a device cache has no host buffers: use host_buffers() to copy them out")

    def address(self, layer: int, row: int) -> int:
        """Where row ``row`` (of this view) of buffer ``layer`` (2*i keys, 2*i+1 values of layer i) starts."""
        return self.bases[layer] + (self.first_row + row) * self.row_bytes

    def host_buffers(self) -> list[np.ndarray]:
        """A host copy of this view's buffers, ``[rows, kv_heads, capacity, head_size]`` per K/V of each layer."""
        rows = slice(self.first_row, self.first_row + self.batch_size)
        return [np.asarray(v.numpy())[rows].copy() for v in self.store]

    @property
    def nbytes(self) -> int:
        return self.layers * self.batch_size * self.row_bytes

    def _bind(self, session: Any) -> DeviceBinding:
        return DeviceBinding(session, self)

    def _view(self, first: int, rows: int) -> DeviceKVCache:
        other = DeviceKVCache.__new__(DeviceKVCache)
        other.__dict__.update(self.__dict__)
        other.binding = None
        other.first_row = self.first_row + first
        other.batch_size = rows
        return other

    def row(self, i: int) -> DeviceKVCache:
        other = self._view(i, 1)
        other.lengths = self.lengths[i : i + 1].copy()
        return other

    def rows(self, first: int, end: int) -> DeviceKVCache:
        other = self._view(first, end - first)
        other.lengths = self.lengths[first:end]
        return other

    def _spans(self, src: DeviceKVCache, pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """The copies that give row ``d`` of this cache row ``s`` of ``src`` (whole rows, every K/V buffer)."""
        return [(self.address(j, d), src.address(j, s), self.row_bytes) for d, s in pairs for j in range(self.layers)]

    def reorder(self, parents: np.ndarray) -> int:
        moved = [int(i) for i in np.flatnonzero(parents != np.arange(len(parents)))]
        if moved:
            sources = sorted({int(parents[i]) for i in moved})
            scratch = DeviceKVCache(self.manifest, self.capacity, len(sources), self.device)
            slot = {s: k for k, s in enumerate(sources)}
            # stage the sources first: a row may be both a source and a target
            self.device.copy(scratch._spans(self, [(k, s) for s, k in slot.items()]))
            self.device.copy(self._spans(scratch, [(i, slot[int(parents[i])]) for i in moved]))
        return len(moved)

    def widen(self, rows: int) -> None:
        self.device.copy(self._spans(self, [(r, 0) for r in range(1, rows)]))
        self.lengths[:rows] = self.lengths[0]

    def copy(self) -> DeviceKVCache:
        other = DeviceKVCache(self.manifest, self.capacity, self.batch_size, self.device)
        self.device.copy(other._spans(self, [(r, r) for r in range(self.batch_size)]))
        other.lengths = self.lengths.copy()
        return other


class DeviceBinding:
    """The IO binding of one :class:`DeviceKVCache` view: its buffers bound by address as past and present, the
    ids and lengths in device buffers, ``total_sequence_length`` and ``logits_to_keep`` in host memory (the CUDA
    provider's GroupQueryAttention and Slice read them there), the logits bound in device memory and copied to the
    host after each run."""

    def __init__(self, session: Any, cache: DeviceKVCache) -> None:
        self.session = session
        self.device = d = cache.device
        m = cache.manifest
        c = m.contract
        from .contract import Name

        self.io = io = session.io_binding()
        past = [n for pair in c.past_names() for n in pair]
        present = [n for pair in c.present_names() for n in pair]
        shape = [cache.batch_size, *cache.row_shape]
        for j, (name, out) in enumerate(zip(past, present, strict=True)):
            address = cache.address(j, 0)
            io.bind_input(name, d.name, d.device_id, cache.dtype.type, shape, address)
            io.bind_output(out, d.name, d.device_id, cache.dtype.type, shape, address)
        self.names = (str(c.name(Name.INPUT_IDS)), str(c.name(Name.SEQLENS_K)), c.outputs[Name.LOGITS])
        self.vocab = m.vocab_size
        self.batch = cache.batch_size
        ort = d._ort
        self.total = np.zeros((), dtype=np.int32)
        self.keep = np.ones(1, dtype=np.int64)
        self._total_value = ort.OrtValue.ortvalue_from_numpy(self.total)
        self._keep_value = ort.OrtValue.ortvalue_from_numpy(self.keep)
        io.bind_ortvalue_input(str(c.name(Name.TOTAL_SEQUENCE_LENGTH)), self._total_value)
        io.bind_ortvalue_input(str(c.name(Name.LOGITS_TO_KEEP)), self._keep_value)
        self.seqlens = np.zeros(cache.batch_size, dtype=np.int32)
        self._seqlens_value = d.allocate((cache.batch_size,), np.dtype(np.int32))
        io.bind_ortvalue_input(self.names[1], self._seqlens_value)
        # each row's valid positions (graphs with query_seqlens): the run's width, in device memory as seqlens_k,
        # written when the width changes (a captured decode graph keeps reading the same address)
        self.query: np.ndarray | None = None
        self.query_width = 0
        if c.name(Name.QUERY_SEQLENS):
            self.query = np.zeros(cache.batch_size, dtype=np.int32)
            self._query_value = d.allocate((cache.batch_size,), np.dtype(np.int32))
            io.bind_ortvalue_input(str(c.name(Name.QUERY_SEQLENS)), self._query_value)
        self._shape: tuple[int, int] | None = None  # (positions, positions kept) the ids and logits are bound for
        self._values: dict[tuple[int, int], tuple[Any, Any]] = {}  # (n, n_last) -> device ids and logits
        self.graph_id: int | None = None  # the CUDA graph this binding's decode steps replay
        self._capture = d.cuda_graph
        self.capacity = cache.capacity
        self._run_options: dict[bool, Any] = {}
        self.last: np.ndarray | None = None

    def _bind(self, n: int, n_last: int) -> tuple[Any, Any]:
        key = (n, n_last)
        values = self._values.get(key)
        if values is None:
            d = self.device
            ids = d.allocate((self.batch, n), np.dtype(np.int64))
            values = (ids, d.allocate((self.batch, n_last, self.vocab), np.dtype(np.float32)))
            # one set of buffers per shape at a time, except a decode step's: its captured graph replays them
            self._values = {k: v for k, v in self._values.items() if self._capture and k == (1, 1)}
            self._values[key] = values
        if self._shape != key:
            self.io.bind_ortvalue_input(self.names[0], values[0])
            self.io.bind_ortvalue_output(self.names[2], values[1])
            self.keep[0] = n_last
            self._shape = key
        return values

    def _options(self, capture: bool) -> Any:
        opts = self._run_options.get(capture)
        if opts is None:
            opts = self.device._ort.RunOptions()
            if self._capture:
                if capture and self.graph_id is None:
                    self.graph_id = self.device.graph_id()
                opts.add_run_config_entry("gpu_graph_id", str(self.graph_id) if capture else NO_CAPTURE)
            self._run_options[capture] = opts
        return opts

    def run(
        self, ids: np.ndarray, cache: DeviceKVCache, length: int, n_last: int, counts: np.ndarray | None = None
    ) -> np.ndarray:
        assert counts is None  # DeviceKVCache.ragged is False: every row runs the run's width
        b, n = ids.shape
        ids_value, logits_value = self._bind(n, n_last)
        ids_value.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        np.add(cache.lengths, n - 1, out=self.seqlens)
        self._seqlens_value.update_inplace(self.seqlens)
        if self.query is not None and self.query_width != n:  # a decode loop writes nothing here
            self.query[...] = n
            self._query_value.update_inplace(self.query)
            self.query_width = n
        decode = n == 1 and n_last == 1
        capture = self._capture and decode
        # a captured decode graph holds total_sequence_length at the capacity (the row lengths come from seqlens_k)
        self.total[...] = self.capacity if decode and self.device.hold_total else length + n
        self.session.run_with_iobinding(self.io, self._options(capture))
        logits = np.asarray(logits_value.numpy())
        self.last = logits[:, -1, :]
        return logits

    def close(self) -> None:
        """Release this binding's captured CUDA graph (if any): its device memory and its id."""
        if self.graph_id is not None:
            graph_id, self.graph_id = self.graph_id, None
            self.session.release_captured_graph(graph_id)

    def __del__(self) -> None:  # a cache (or a row view of one) that goes away takes its captured graph with it
        try:
            self.close()
        except Exception:  # interpreter shutdown, or a session already gone
            pass
