"""``edgeroute bench`` on an encoder model: what its task's call (embed, classify, entities) does per second on
short texts (one at a time, and 32 at a time) and long ones (8 at a time), the latency of one short text (p50,
p95) and the process's peak memory. The texts are edgeroute's built-in quality texts (short: ~15 tokens; long:
eight of them joined, cut to the model's length). Peers run beside it in ``bench/encoders.py``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import click
import edgeroute as er
from edgeroute.export.encoder_quality import QUALITY_TEXTS


def call_of(model: er.EncoderModel) -> Callable[[list[str]], Any]:
    """The model's task call, long texts cut to its length."""
    if model.task == "embedding":
        return lambda texts: model.embed(texts, overflow="truncate")
    if model.task == "classification":
        return lambda texts: model.classify(texts, top_k=None, overflow="truncate")
    return lambda texts: model.entities(texts, overflow="truncate")


def bench_encoder(model: er.EncoderModel, runs: int, warmup: int, progress: Callable[[int], None]) -> dict[str, Any]:
    """Median figures over ``runs`` passes of each measure (``progress(1)`` after each pass, warm-up included)."""
    from .bench_cmd import peak_rss_mb

    call = call_of(model)
    short = list(QUALITY_TEXTS)
    long = [" ".join(QUALITY_TEXTS[i : i + 8]) for i in range(0, 64, 8)]
    tokens = {
        "short": sum(model.count_tokens(short)),
        "long": sum(min(n, model.max_length) for n in model.count_tokens(long)),
    }
    cases = (("short_b1", short, 1), ("short_b32", short, 32), ("long_b8", long, 8))
    rows: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    latency: list[float] = []
    for i in range(warmup + runs):
        for name, texts, batch in cases:
            t0 = time.perf_counter()
            for s in range(0, len(texts), batch):
                call(texts[s : s + batch])
            if i >= warmup:
                rows[name].append(time.perf_counter() - t0)
        for text in short[:16]:
            t0 = time.perf_counter()
            call([text])
            if i >= warmup:
                latency.append(1000 * (time.perf_counter() - t0))
        progress(1)
    out: dict[str, Any] = {"task": model.task, "precision": model.manifest.get("precision"), "runs": runs}
    for name, texts, _ in cases:
        seconds = statistics.median(rows[name])
        kind = name.split("_")[0]
        out[f"{name}_texts_s"] = round(len(texts) / seconds, 1)
        out[f"{name}_tokens_s"] = round(tokens[kind] / seconds, 1)
    latency.sort()
    out["latency_p50_ms"] = round(latency[len(latency) // 2], 2)
    out["latency_p95_ms"] = round(latency[min(len(latency) - 1, int(0.95 * len(latency)))], 2)
    out["tokens_per_short_text"] = round(tokens["short"] / len(short), 1)
    out["tokens_per_long_text"] = round(tokens["long"] / len(long), 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def show(path: str, r: dict[str, Any], provider: str) -> None:
    click.echo(
        f"{path}: {r['task']}, {r['precision']}, {provider}; median of {r['runs']}; short texts"
        f" ~{r['tokens_per_short_text']:.0f} tokens, long ~{r['tokens_per_long_text']:.0f}"
    )
    for name, label in (
        ("short_b1", "short, one at a time"),
        ("short_b32", "short, 32 at a time"),
        ("long_b8", "long, 8 at a time"),
    ):
        click.echo(f"  {label:<22} {r[f'{name}_texts_s']:>8.1f} texts/s {r[f'{name}_tokens_s']:>10.1f} tokens/s")
    click.echo(f"  one short text         p50 {r['latency_p50_ms']:.2f} ms, p95 {r['latency_p95_ms']:.2f} ms")
    click.echo(f"  peak RSS               {r['peak_rss_mb']:.1f} MB")
