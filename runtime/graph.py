"""The graph layer's model: :class:`Graph` is a loaded model folder (manifest + onnxruntime session + tokenizer)
that runs its graph over a KV cache. Shared and immutable; it knows nothing of sequences, routers or text output
(:class:`~edgeroute.Model`, in ``model.py``, adds generation on top).

A Graph may be used from several threads at once: it holds no per-request state (``InferenceSession.run`` is
thread-safe), and every KV cache belongs to whoever created it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .adapters import DEFAULT_MAX_ADAPTERS, Adapter, AdapterSet, LoraLayout
from .device_cache import Device, DeviceKVCache
from .encoder import is_encoder_folder
from .errors import ConfigError, ModelLoadError
from .kv_cache import Cache, KVCache, SharedKVCache
from .manifest import Manifest, check_files, sha256_of
from .prefix_cache import DEFAULT_DISK, DEFAULT_MEMORY, PrefixCache, fingerprint
from .session import create_session, node_counts
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
G = TypeVar("G", bound="Graph")
DEFAULT_SHARED_CONTEXT = 4096  # tokens a shared KV buffer holds unless the user asks for another size


class Graph:
    """An exported model folder ready to run: build it with :meth:`load` (``Model.load`` builds the
    :class:`~edgeroute.Model` that generates)."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        session: Any,
        tokenizer: Tokenizer,
        provider: str,
        context_size: int | None = None,
        kv: str | None = None,
        cuda_graph: bool = False,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.provider = provider
        m = manifest
        self.shared_kv = m.kv_layout == "shared"
        if context_size is not None and (
            not isinstance(context_size, int) or isinstance(context_size, bool) or context_size < 1
        ):
            raise ConfigError("context_size", context_size, "must be a positive integer")
        default = min(m.context_length, DEFAULT_SHARED_CONTEXT) if self.shared_kv else m.context_length
        self._context = min(context_size or default, m.context_length)
        self.special_ids = frozenset(tokenizer.special_ids) | frozenset(m.eos_token_ids)
        # graph rows beyond the tokenizer (a vocabulary padded for speed) have no text: never generated
        self.undecodable_ids = range(min(tokenizer.vocab_size, m.vocab_size), m.vocab_size)
        m.contract.check_session(session)
        self.kv = _kv_placement(kv, provider, self.shared_kv, cuda_graph, m.lora is not None)
        #: the LoRA adapters loaded on this model (``edgeroute.adapters``); empty for a graph without adapter inputs
        self.adapters = AdapterSet(LoraLayout(m.contract) if m.lora else None, max_adapters)
        #: the prefix cache (``edgeroute.prefix_cache``), when ``load`` was given one
        self.prefix_cache: PrefixCache | None = None
        self.device = Device(provider, cuda_graph) if self.kv == "device" else None

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls: type[G],
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        spin: bool = True,
        context_size: int | None = None,
        kv: str | None = None,
        cuda_graph: bool = False,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
        prefix_cache: bool | str | Path | None = None,
        prefix_cache_memory: int = DEFAULT_MEMORY,
        prefix_cache_disk: int = DEFAULT_DISK,
    ) -> G:
        """Load an edgeroute model folder.

        Args:
            path: the folder written by ``edgeroute export`` (it holds ``edgeroute.json``).
            provider: ``"cpu"`` or ``"cuda"``; an unavailable provider raises ``ProviderUnavailableError``.
            threads: onnxruntime intra-op threads (default: the machine's cores).
            spin: let idle intra-op threads spin between runs (fastest for one model); pass False for models
                that run in turn, such as a speculative draft and its target.
            context_size: the most tokens one sequence may hold (prompt + generated), at most the model's context.
                Graphs with a shared KV buffer reserve this many positions per sequence; their default is
                the model's context capped at 4,096 tokens. Other graphs default to the model's context.
            kv: where a shared KV buffer lives: ``"host"`` (NumPy memory, the CPU default) or ``"device"``
                (onnxruntime's memory on the provider's device, bound by address: the CUDA default, so nothing of
                the cache crosses to the host; on the CPU provider it is CPU memory, the same code path).
                Graphs with a concatenated cache (the optimum backend) are host-only.
            cuda_graph: on CUDA with a device cache, capture each decode step once and replay it
                (onnxruntime's ``enable_cuda_graph``; ``runtime/device_cache.py`` says when it does not apply).
            max_adapters: the most LoRA adapters loaded at once (a graph exported with ``--lora-rank``); the
                adapters the folder lists are loaded now and count (``AdapterError`` when one does not fit).
            prefix_cache: keep prompts' KV positions for later prompts that start with them (``edgeroute.
                prefix_cache``): ``True`` in memory, a directory path in memory and on disk across restarts
                (None: off). Shared-buffer graphs on the host KV cache.
            prefix_cache_memory, prefix_cache_disk: the cache's budgets in bytes (512 MiB, 8 GiB).
        """
        folder = Path(path)
        if is_encoder_folder(folder):
            task = json.loads((folder / "edgeroute.json").read_text(encoding="utf-8"))["task"]
            raise ModelLoadError(
                f"{folder} is an encoder model (task {task}): load it with edgeroute.load() or"
                " edgeroute.EncoderModel.load()"
            )
        manifest = Manifest.load(folder)
        check_files(folder, manifest)  # inside the folder, present, and the sizes the export recorded
        graph = folder / manifest.graph
        tokenizer = Tokenizer.from_folder(folder, manifest.chat_template, manifest.special_tokens)
        if cuda_graph:  # before the session, whose creation is the slow part
            _kv_placement(kv, provider, manifest.kv_layout == "shared", cuda_graph, manifest.lora is not None)
        session = create_session(graph, provider, threads, spin, cuda_graph=cuda_graph)
        model = cls(folder, manifest, session, tokenizer, provider, context_size, kv, cuda_graph, max_adapters)
        for name, entry in manifest.adapters.items():  # small files: their hashes checked, not only their sizes
            path = folder / str(entry["file"])
            if sha256_of(path) != entry["sha256"]:
                raise ModelLoadError(f"{path} (adapter {name!r}) does not match its recorded SHA-256: it was changed")
            model.adapters.load(name, path)
        if prefix_cache is not None and prefix_cache is not False:
            model.use_prefix_cache(None if prefix_cache is True else prefix_cache, prefix_cache_memory,
                                   prefix_cache_disk)  # fmt: skip
        return model

    @property
    def can_cache_prefixes(self) -> bool:
        """Whether this model can hold a prefix cache: a shared-buffer graph on the host KV cache."""
        return self.shared_kv and self.kv == "host"

    def use_prefix_cache(
        self, directory: str | Path | None = None, memory: int = DEFAULT_MEMORY, disk: int = DEFAULT_DISK
    ) -> PrefixCache:
        """Give this model a prefix cache (in memory; on disk too with ``directory``) and return it."""
        if not self.can_cache_prefixes:
            raise ConfigError("prefix_cache", directory, "needs a shared-buffer graph on the host KV cache (kv='host')")
        m = self.manifest
        shape = (2 * m.num_layers, m.num_kv_heads, m.head_size)
        self.prefix_cache = PrefixCache(fingerprint(self), shape, np.dtype(m.kv_dtype), memory, directory, disk)
        return self.prefix_cache

    # -- the graph -------------------------------------------------------------------------------------------
    def node_providers(self) -> dict[str, int]:
        """How many nodes of the optimised graph onnxruntime gave each execution provider (``{"CPUExecutionProvider":
        306}``), as this session recorded it: a CUDA session's compute nodes on the CPU raise at load
        (``ProviderUnavailableError``), its shape arithmetic there shows here."""
        return node_counts(self.session)

    @property
    def context_length(self) -> int:
        """The most tokens one sequence may hold here: the model's context, or the smaller ``context_size``."""
        return self._context

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def new_cache(
        self, batch_size: int = 1, capacity: int | None = None, adapter: str | Adapter | None = None
    ) -> Cache:
        """An empty KV cache for this model: a :class:`KVCache`, or a :class:`SharedKVCache` of ``capacity``
        positions (default: the context size) when the graph shares its past and present buffers. Every row runs
        ``adapter`` (a loaded adapter's name or the :class:`Adapter`; None: the base model)."""
        chosen = self.adapter(adapter) if not isinstance(adapter, Adapter) else adapter
        positions = self._context if capacity is None else min(int(capacity), self._context)
        cache: Cache
        if self.device is not None:
            cache = DeviceKVCache(self.manifest, positions, batch_size, self.device)
        elif self.shared_kv:
            cache = SharedKVCache(self.manifest, positions, batch_size)
        else:
            cache = KVCache(self.manifest, batch_size)
        if chosen is not None:
            cache.set_adapter(chosen)
        return cache

    # -- adapters --------------------------------------------------------------------------------------------
    def adapter(self, name: str | None) -> Adapter | None:
        """The loaded adapter called ``name`` (None: the base model); ``ConfigError`` on ``adapter`` when no adapter
        of that name is loaded."""
        return self.adapters.get(name)

    def load_adapter(self, name: str, path: str | Path) -> Adapter:
        """Load a LoRA adapter (a PEFT folder, or an adapter file ``edgeroute adapter add`` wrote) as ``name``, while
        other requests run. Raises :class:`~edgeroute.AdapterError` when it cannot be read or does not fit this
        model's graph (another base, a rank above the graph's, a module the graph does not take)."""
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``: requests cannot name it from now on; running ones finish on it."""
        self.adapters.unload(name)

    def forward(
        self,
        input_ids: np.ndarray,
        cache: Cache,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run the graph on ``input_ids`` ``[batch, n]`` after what ``cache`` holds; update the cache in place.

        ``attention_mask`` defaults to ones over ``cache.length + n`` positions and ``position_ids`` to the
        positions after the cache (graphs with a shared KV buffer derive both from the cache's lengths). Returns
        the last position's logits, ``[batch, vocab]`` float32.
        """
        return self.forward_last(input_ids, cache, 1, attention_mask, position_ids)[:, -1, :]

    def forward_last(
        self,
        input_ids: np.ndarray,
        cache: Cache,
        n_last: int,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Like :meth:`forward`, returning the logits of the last ``n_last`` positions, ``[batch, n_last, vocab]``.

        Graphs exported by edgeroute compute only those positions (their ``logits_to_keep`` input).
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        n = ids.shape[1]
        if not 1 <= n_last <= n:
            raise ConfigError("n_last", n_last, f"must be in [1, {n}] (the number of input positions)")
        if n_last > 1 and self.manifest.logits == "last":
            raise ConfigError("n_last", n_last, "this graph returns only the last position's logits")
        logits = cache.run(self.session, ids, n_last, attention_mask, position_ids)
        return logits.copy() if cache.reuses_output else logits  # a reused buffer is overwritten by the next run

    def step_logits(self, input_ids: np.ndarray, cache: Cache) -> np.ndarray:
        """Like :meth:`forward` for a decode loop that consumes each result before the next run on ``cache``: it
        may return a buffer the cache reuses (a view of a shared KV buffer's bound output, valid until the next
        run on this cache) instead of a copy, which saves a pass over the vocabulary's logits per token."""
        return cache.step(self.session, input_ids)

    def shares_tokenizer(self, other: Graph) -> bool:
        """Whether ``other`` has this graph's vocabulary (a draft or contrast model must; a judge may not)."""
        return (
            self.vocab_size == other.vocab_size
            and self.tokenizer.backend.get_vocab() == other.tokenizer.backend.get_vocab()
        )

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt given as text or as ids (a list, tuple or 1-D integer array). A prompt must give
        at least one token; bytes are refused (decode them first: they are not token ids)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ConfigError("prompt", prompt, "encodes to no tokens: give some text")
            return ids
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise ConfigError("prompt", bytes(prompt)[:16], "is bytes: decode it to a str (or pass token ids)")
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and prompt.dtype.kind in "iu":
            prompt = prompt.tolist()
        if isinstance(prompt, Sequence) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt
        ):
            if not prompt:
                raise ConfigError("prompt", [], "needs at least one token id")
            return [int(i) for i in prompt]
        raise ConfigError("prompt", prompt, "must be a string or a list of token ids")

    def __repr__(self) -> str:
        m = self.manifest
        name = type(self).__name__
        return f"{name}({str(self.path)!r}, provider={self.provider!r}, layers={m.num_layers}, vocab={m.vocab_size})"


KV_PLACEMENTS = ("host", "device")


def _kv_placement(kv: str | None, provider: str, shared: bool, cuda_graph: bool, lora: bool = False) -> str:
    """Where the KV cache lives for ``Model.load``'s ``kv`` and ``cuda_graph`` (ConfigError when they cannot)."""
    if kv is not None and kv not in KV_PLACEMENTS:
        raise ConfigError("kv", kv, f"must be one of {', '.join(KV_PLACEMENTS)}")
    if lora and (kv == "device" or cuda_graph):  # the per-row adapter weights are host arrays (adapters.LoraRows)
        raise ConfigError("kv" if kv == "device" else "cuda_graph", kv or cuda_graph,
                          "a graph with LoRA adapter inputs runs on the host KV cache (kv='host')")  # fmt: skip
    if lora:
        return "host"
    if kv == "device" and not shared:
        raise ConfigError("kv", kv, "a device cache needs a shared KV buffer graph (export with the fused backend)")
    if cuda_graph:
        if not isinstance(cuda_graph, bool):
            raise ConfigError("cuda_graph", cuda_graph, "must be True or False")
        if provider != "cuda":
            raise ConfigError("cuda_graph", cuda_graph, "CUDA graphs need provider 'cuda'")
        if not shared or kv == "host":
            raise ConfigError("cuda_graph", cuda_graph, "CUDA graphs need a device KV cache over a shared-buffer graph")
    if kv is None:
        return "device" if provider == "cuda" and shared else "host"
    return kv
