"""``edgeroute bench MODEL``: time to first token, prefill and decode speed, router cost, peak memory."""

from __future__ import annotations

import json
import resource
import statistics
import sys
from collections.abc import Callable
from typing import Any

import click
import edgeroute as er

from .options import build_config, load_model, model_options, sampling_options, verbose_option
from .progress import Steps

BENCH_PROMPT = "Write a short story about a robot who learns to paint."


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, which belongs to this process's own memory map (``ru_maxrss`` also
    counts a parent's peak inherited across fork and exec). Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def run_bench(
    model: er.Model,
    config: er.GenerationConfig,
    ids: list[int],
    runs: int,
    warmup: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Median figures over ``runs`` generations of exactly ``config.max_new_tokens`` tokens; ``progress(1)`` after
    each generation (warm-up included)."""
    rows = []
    tokens: list[int] = []
    for i in range(warmup + runs):
        gen = model.generator(config)
        gen.append(ids)
        comp = gen.run()
        u = comp.usage
        if i >= warmup:
            rows.append(
                {
                    "ttft_ms": 1000 * (u.time_to_first_token or 0.0),
                    "prefill_tok_s": u.prompt_tokens / u.prefill_seconds if u.prefill_seconds else 0.0,
                    "decode_tok_s": u.tokens_per_second,
                    "router_us_per_token": 1e6 * u.router_seconds / max(u.completion_tokens, 1),
                }
            )
        tokens = comp.token_ids
        if progress is not None:
            progress(1)
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    return {
        **med,
        "completion_tokens": len(tokens),
        "prompt_tokens": len(ids),
        "runs": runs,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "token_ids": tokens,
    }


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--prompt", default=BENCH_PROMPT, show_default=True, help="Prompt (chat template applied).")
@click.option(
    "--new-tokens",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Tokens generated per run (end-of-sequence is suppressed until then).",
)
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Measured runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Unmeasured runs.")
@click.option(
    "--quality",
    is_flag=True,
    help="Also measure the graph's perplexity over edgeroute's quality text and its top-1 agreement with the fp32"
    " PyTorch reference the export recorded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@sampling_options
@model_options
@verbose_option
def bench(
    model_path: str,
    prompt: str,
    new_tokens: int,
    runs: int,
    warmup: int,
    quality: bool,
    as_json: bool,
    provider: str,
    threads: int | None,
    ctx_size: int | None,
    **flags: Any,
) -> None:
    """Benchmark MODEL on a fixed prompt: greedy unless sampling flags are given; median of --runs. An encoder
    model: its task's call on short and long texts (texts/s, tokens/s), one text's latency, peak memory."""
    from edgeroute.encoder import is_encoder_folder

    if is_encoder_folder(model_path):
        from . import encoder_bench

        ctx = click.get_current_context()
        mine = ("model_path", "runs", "warmup", "as_json", "provider", "threads")
        other = [
            n
            for n in ctx.params
            if n not in mine and ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT
        ]
        if other:
            raise click.UsageError(
                f"--{other[0].replace('_', '-')} is a generation option: {model_path} is an encoder model"
            )
        encoder = er.EncoderModel.load(model_path, provider, threads)
        with Steps("bench") as steps:
            steps.start("running the texts", total=warmup + runs, unit="passes")
            result = encoder_bench.bench_encoder(encoder, runs, warmup, steps.advance)
        result["provider"] = provider
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            encoder_bench.show(model_path, result, provider)
        return
    model = load_model(model_path, provider, threads, ctx_size=ctx_size)
    if flags.get("temperature") is None and not any(flags.get(k) is not None for k in ("top_k", "top_p", "min_p")):
        flags["temperature"] = 0.0
    flags.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    config = build_config(model, flags)
    if model.tokenizer.chat_template:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    else:
        ids = model.tokenizer.encode(prompt)
    with Steps("bench") as steps:
        steps.start(f"generating {new_tokens} tokens", total=warmup + runs, unit="runs")
        result = run_bench(model, config, ids, runs, warmup, steps.advance)
        if quality:
            from edgeroute.quality import measure

            steps.start("measuring the quality text")
            result["quality"] = measure(model, (model.manifest.provenance.get("validation") or {}).get("quality"))
    result["provider"] = provider
    result["precision"] = model.manifest.precision
    result["quantization"] = model.manifest.quantization.get("method", "none")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    result.pop("token_ids")
    click.echo(
        f"{model_path}: {result['precision']}, quantisation {result['quantization']}, {provider}; "
        f"{result['prompt_tokens']}-token prompt, {result['completion_tokens']} new tokens, "
        f"median of {runs}"
    )
    click.echo(f"  time to first token  {result['ttft_ms']:.1f} ms")
    click.echo(f"  prefill              {result['prefill_tok_s']:.1f} tok/s")
    click.echo(f"  decode               {result['decode_tok_s']:.1f} tok/s")
    click.echo(f"  router               {result['router_us_per_token']:.1f} us/token")
    click.echo(f"  peak RSS             {result['peak_rss_mb']:.1f} MB")
    q = result.get("quality")
    if q:
        click.echo(f"  perplexity           {q['perplexity']:.3f} over {q['tokens']} tokens of the quality text")
        if "perplexity_change_pct" in q:
            click.echo(
                f"  vs fp32 PyTorch      {q['perplexity_change_pct']:+.2f}% perplexity"
                + (f", top-1 agreement {100 * q['top1_agreement']:.1f}%" if "top1_agreement" in q else "")
            )
        if "top1_agreement" not in q:
            click.echo("  top-1 agreement      not measured: the export recorded no PyTorch reference (--no-validate)")
