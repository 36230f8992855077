"""``edgeroute export SOURCE OUT_DIR``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click
from edgeroute.export.core import BACKENDS, BLOCK_SIZES, DEVICES, DTYPES, QUANTIZE

from .options import verbose_option


def _progress_printer() -> Callable[[str, str, float], None] | None:
    """One line per stage with its elapsed time, on a terminal only."""
    if not sys.stderr.isatty():
        return None

    def show(stage: str, event: str, seconds: float) -> None:
        if event == "start":
            click.echo(f"  {stage} ...", err=True, nl=False)
        else:
            click.echo(f"\r  {stage} done in {seconds:.1f}s", err=True)

    return show


@click.command()
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="fp32",
    show_default=True,
    help="Precision of the graph (fp16 is for CUDA).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE),
    default="none",
    show_default=True,
    help="Block-wise weight quantisation (onnxruntime MatMulNBits, 8 or 4 bits).",
)
@click.option(
    "--block-size",
    type=click.Choice([str(b) for b in BLOCK_SIZES]),
    default="32",
    show_default=True,
    help="Quantisation block size.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Where PyTorch runs while exporting and validating.",
)
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Base checkpoint folder of a LoRA adapter (default: the adapter's own reference).",
)
@click.option(
    "--context-length", type=click.IntRange(min=1), default=None, help="Cap the model's context length in the manifest."
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="fused: edgeroute's own graph (fused attention, shared in-place KV buffer; llama, mistral, qwen2, phi3,"
    " qwen3, gemma3_text, smollm3);"
    " optimum: any decoder optimum exports; auto: fused where it applies.",
)
@click.option(
    "--no-calibration",
    is_flag=True,
    help="int4: quantise without weighting by calibration activations (edgeroute's built-in text).",
)
@click.option(
    "--tokenizer",
    "tokenizer",
    type=click.Path(file_okay=False),
    default=None,
    help="A folder with the original checkpoint's tokenizer.json (and chat template) to ship instead of the"
    " source's own.",
)
@click.option("--no-validate", is_flag=True, help="Skip the parity and tokenizer checks against PyTorch.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT_DIR if it is an edgeroute model folder (only after the export succeeded; never the source).",
)
@verbose_option
def export(
    source: str,
    out_dir: str,
    dtype: str,
    quantize: str,
    block_size: str,
    device: str,
    base: str | None,
    context_length: int | None,
    backend: str,
    no_calibration: bool,
    tokenizer: str | None,
    no_validate: bool,
    force: bool,
) -> None:
    """Export SOURCE (checkpoint folder, LoRA adapter folder or .gguf file) to the model folder OUT_DIR."""
    from edgeroute.export import export_model

    path = export_model(
        source,
        out_dir,
        dtype=dtype,
        quantize=quantize,
        device=device,
        validate=not no_validate,
        force=force,
        base=base,
        context_length=context_length,
        block_size=int(block_size),
        backend=backend,
        calibrate=not no_calibration,
        tokenizer=tokenizer,
        progress=_progress_printer(),
    )
    manifest = json.loads((path / "edgeroute.json").read_text())
    v = manifest["provenance"].get("validation")
    click.echo(
        f"exported {source} -> {path} ({manifest['precision']}, quantisation {manifest['quantization']['method']},"
        f" {manifest['provenance'].get('backend', 'optimum')} graph)"
    )
    if v:
        q = v["quality"]
        line = (
            f"  max |Δlogit| {v['max_abs_logit_diff']:.2e}; top-1 agreement {100 * q['top1_agreement']:.1f}%;"
            f" perplexity {q['perplexity']:.3f} vs {q['perplexity_reference']:.3f}"
            f" ({q['perplexity_change_pct']:+.2f}%)"
        )
        if "greedy_identical" in v:
            line += f"; greedy {v['greedy_tokens']} tokens identical: {'yes' if v['greedy_identical'] else 'no'}"
        click.echo(line)
        t = v.get("tokenizer")
        if t:
            rate = "n/a" if t["whole_word_rate"] is None else f"{100 * t['whole_word_rate']:.0f}%"
            click.echo(
                f"  tokenizer: round trip {'yes' if t['roundtrip'] else 'no'}; {t['chars_per_token']:.2f} characters"
                f" per token; whole words kept whole {rate} of {t['whole_words']}"
            )
