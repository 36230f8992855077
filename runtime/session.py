"""onnxruntime session creation: providers resolved against what is installed, threads, optimisation level.

A provider that was asked for but is not available raises :class:`ProviderUnavailableError`; there is never a
silent fallback to the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .errors import ConfigError, ModelLoadError, ProviderUnavailableError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    """The short names (``cpu``, ``cuda``) of the execution providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def _installed_description() -> str:
    return f"onnxruntime {ort.__version__} ({ort.get_device()}) offers " + ", ".join(ort.get_available_providers())


def resolve_provider(provider: str) -> str:
    """The onnxruntime provider name for ``provider``; raises when it is unknown or unavailable."""
    if provider not in PROVIDERS:
        raise ConfigError("provider", provider, f"must be one of {', '.join(PROVIDERS)}")
    full = PROVIDERS[provider]
    if full not in ort.get_available_providers():
        hint = " (install onnxruntime-gpu in place of onnxruntime)" if provider == "cuda" else ""
        raise ProviderUnavailableError(f"provider {provider!r} is not available: {_installed_description()}{hint}")
    return full


def default_threads() -> int:
    """Intra-op threads when none are given: the CPUs this process may run on (its affinity: ``taskset``, a
    container's cpuset), else the machine's count, at least 1.

    Measured (perf notes): explicit ``intra_op_num_threads`` = cores and ``inter_op_num_threads=1`` is worth up to
    60% over onnxruntime's defaults on small machines; more threads than the CPUs allowed only fight for them.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    n = len(affinity(0)) if affinity is not None else os.cpu_count()
    return max(1, n or 1)


def create_session(
    graph: Path,
    provider: str = "cpu",
    threads: int | None = None,
    spin: bool = True,
    cuda_graph: bool = False,
    check: bool = True,
) -> ort.InferenceSession:
    """An ``InferenceSession`` over ``graph`` on ``provider`` with explicit thread settings.

    ``spin=False`` makes the intra-op threads stop spinning when a run returns. Keep the default for a model used
    alone (spinning threads answer the next run sooner); turn it off for models used in turn, such as a
    speculative draft and its target, whose spinning pools would otherwise fight over the cores
    (bench/results/speculative-smollm2-2026-11-23.md).

    ``cuda_graph`` turns on the CUDA provider's graph capture (``enable_cuda_graph``): runs then name a
    ``gpu_graph_id`` (``runtime/device_cache.py`` does). The session records which provider each node was given
    (:func:`node_placement`); on CUDA, a compute node placed on the CPU raises :class:`ProviderUnavailableError`
    (unless ``check`` is False: ``edgeroute info`` reports the placement instead).
    """
    full = resolve_provider(provider)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError("threads", threads, "must be an integer >= 1 or None")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    providers: list[Any] = [full]
    if cuda_graph:
        if provider != "cuda":
            raise ConfigError("cuda_graph", cuda_graph, "CUDA graphs need provider 'cuda'")
        providers = [(full, {"enable_cuda_graph": "1"})]
    try:
        sess = ort.InferenceSession(str(graph), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt or unreadable graphs
        raise ModelLoadError(f"cannot load graph {graph}: {first_line(e)}") from e
    if full not in sess.get_providers():
        raise ProviderUnavailableError(
            f"provider {provider!r} could not be initialised (session runs on {sess.get_providers()}):"
            f" {_installed_description()}"
        )
    if check and full != PROVIDERS["cpu"]:
        check_placement(node_placement(sess), full)
    return sess


# the operators that carry a layer's activations: on a GPU session, one of them on the CPU provider means its
# kernel is missing there (or does not take these types), and every run would copy activations both ways. Other
# CPU nodes (index and shape arithmetic, such as the Neg of logits_to_keep) are placed there by the CUDA provider
# on purpose and are only reported (``edgeroute info --provider cuda``).
COMPUTE_OPS = frozenset(
    {
        "Attention", "Conv", "Einsum", "Erf", "FastGelu", "Gelu", "Gemm", "GroupQueryAttention", "GatherBlockQuantized",
        "LayerNormalization", "MatMul", "MatMulInteger", "MatMulNBits", "MultiHeadAttention", "Pow", "QuickGelu",
        "ReduceMean", "RotaryEmbedding", "Sigmoid", "SimplifiedLayerNormalization", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "Softmax", "Sqrt", "Tanh",
    }
)  # fmt: skip


def node_placement(session: Any) -> dict[str, dict[str, int]]:
    """``{provider: {op_type: count}}``: which execution provider onnxruntime gave each node of the optimised
    graph (the session must record it: :func:`create_session`'s do)."""
    placed: dict[str, dict[str, int]] = {}
    for sub in session.get_provider_graph_assignment_info():
        ops = placed.setdefault(sub.ep_name, {})
        for node in sub.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return placed


def node_counts(session: Any) -> dict[str, int]:
    """``{provider: nodes}``: :func:`node_placement` summed over operator types."""
    return {ep: sum(ops.values()) for ep, ops in node_placement(session).items()}


def check_placement(placed: dict[str, dict[str, int]], provider: str) -> None:
    """Raise :class:`ProviderUnavailableError` naming the compute operators a ``provider`` session runs on the
    CPU (their kernels are missing on ``provider`` for these types): never a silent fallback."""
    cpu = placed.get(PROVIDERS["cpu"], {})
    missing = {op: n for op, n in sorted(cpu.items()) if op in COMPUTE_OPS}
    if missing:
        listed = ", ".join(f"{op} x{n}" for op, n in missing.items())
        raise ProviderUnavailableError(
            f"{provider} has no kernel for these nodes of the graph, which would run on the CPU: {listed}"
            " (export for this device: edgeroute export --device cuda --dtype fp16)"
        )
