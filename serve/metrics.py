"""The server's Prometheus metrics, in a registry of its own (two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import edgeroute as er
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# a decode step of a 100M-8B model on CPU or GPU: 1 ms .. seconds; a first token: 10 ms .. a minute in a queue
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


_PREFIX = {
    "hits": "Prompts that found cached positions in the prefix cache",
    "misses": "Prompts that found none",
    "hit_tokens": "Prompt positions served from the prefix cache",
    "memory_bytes": "Bytes of KV positions the prefix cache holds in memory",
    "disk_bytes": "Bytes of the prefix cache's directory",
    "disk_rejected": "Cache files refused (another model, corrupt, not the prompt's tokens)",
}


def _reader(source: Callable[[], Any], attr: str) -> Callable[[], float]:
    """A gauge's function: ``attr`` of what ``source()`` returns (0 when it returns None)."""

    def value() -> float:
        return float(getattr(source(), attr, 0) or 0)

    return value


class Metrics:
    """Requests by endpoint and status, tokens, queue depth and active requests (read from the engine when
    scraped), time to first token and inter-token latency; the LoRA adapters loaded (``adapters()``)."""

    def __init__(
        self,
        stats: Callable[[], er.EngineStats | None],
        endpoints: list[str],
        adapters: Callable[[], int] | None = None,
        prefix: Callable[[], er.PrefixCacheStats | None] | None = None,
    ) -> None:
        self.endpoints = frozenset(endpoints)  # any other path is counted as "other" (no label per stray URL)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgeroute_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("edgeroute_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(
            "edgeroute_completion_tokens", "Tokens generated (streamed or returned)", registry=r
        )
        self.ttft = Histogram(
            "edgeroute_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "edgeroute_inter_token_latency_seconds",
            "Between two generated tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "edgeroute_cancelled_requests", "Generations cancelled because their client went away", registry=r
        )

        def read(attr: str) -> Callable[[], float]:
            def value() -> float:
                s = stats()
                return float(getattr(s, attr)) if s is not None else 0.0

            return value

        Gauge("edgeroute_queue_depth", "Requests waiting for a slot", registry=r).set_function(read("queued"))
        Gauge("edgeroute_active_requests", "Requests generating now (slots in use)", registry=r).set_function(
            read("active")
        )
        Gauge("edgeroute_incoming_requests", "Requests being read or parsed (not queued yet)", registry=r).set_function(
            read("incoming")
        )
        Gauge("edgeroute_max_batch", "Slots of the engine", registry=r).set_function(read("max_batch"))
        if prefix is not None:  # the prefix cache's figures, read when scraped (0 without one)
            for attr, what in _PREFIX.items():
                Gauge(f"edgeroute_prefix_cache_{attr}", what, registry=r).set_function(_reader(prefix, attr))
        if adapters is not None:
            Gauge("edgeroute_loaded_adapters", "LoRA adapters loaded on the model", registry=r).set_function(
                lambda: float(adapters())
            )

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.endpoints else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
