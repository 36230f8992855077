"""``edgeroute export SOURCE OUT_DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from edgeroute.export.core import BACKENDS, BLOCK_SIZES, DEVICES, DTYPES, HEADS, QUANTIZE

from .options import named_paths, verbose_option
from .progress import Steps


def step_labels(source: str, quantize: str) -> dict[str, str]:
    """What each step of the export (``edgeroute.export.steps``) is called on stderr."""
    return {
        "load": f"loading {Path(source).name or source}",
        "export": "building the graph",
        "post-process": "post-processing optimum's graph",
        "calibrate": "calibrating",
        "quantise": f"quantising {quantize}",
        "fp16": "casting to fp16",
        "cuda check": "checking the graph on CUDA",
        "validate": "validating against PyTorch",
        "quality": "measuring int8 against fp32",
    }


QUALITY_WARN_PCT = 10.0  # a quantised export whose perplexity rises more than this is flagged


def quality_warning(manifest: dict) -> str | None:
    """A line for a quantised export that changes the model's perplexity by more than QUALITY_WARN_PCT percent on
    the quality text (Gemma 3 270M at int4: +21%), naming what to compare; None otherwise."""
    v = manifest.get("provenance", {}).get("validation") or {}
    q = v.get("quality") or {}
    method = manifest.get("quantization", {}).get("method", "none")
    change = q.get("perplexity_change_pct")
    if method == "none" or change is None or change <= QUALITY_WARN_PCT:
        return None
    options = "--quantize int8, --block-size 16 or --head int8" if method == "int4" else "no quantisation"
    return (
        f"{method} raises perplexity by {change:.1f}% on the quality text (top-1 agreement"
        f" {100 * q['top1_agreement']:.1f}%): this model loses much at this precision; compare {options}"
        " (docs/models.md)"
    )


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
    "--head",
    type=click.Choice(HEADS),
    default=None,
    help="Precision of the LM head (and of a tied embedding) in a quantised export (default: as --quantize);"
    " int8 with --quantize int4 keeps a large-vocabulary head at 8 bits (Gemma 3).",
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
    " qwen3, gemma3_text, smollm3; fp32, int8, int4, fp16);"
    " optimum: any decoder optimum exports; auto: fused where it applies (optimum for fp16).",
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
@click.option(
    "--per-tensor",
    is_flag=True,
    help="An encoder's int8 export: one weight scale per tensor (default: per output channel).",
)
@click.option(
    "--quality-texts",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="An encoder's int8 export: measure it against fp32 on these texts (one per line; default: built-in).",
)
@click.option(
    "--force-quality",
    is_flag=True,
    help="An encoder's int8 export: write it even below the quality gate (the measures are recorded).",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=DIR",
    help="Keep a PEFT LoRA adapter apart from the base (repeatable): the graph takes adapters at run time, chosen"
    " per request; the adapter is written into OUT_DIR/adapters and checked against PEFT.",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(1, 256),
    default=None,
    help="The most rank an adapter module may have (default: the largest of --lora's); alone, it makes a graph for"
    " adapters added later (edgeroute adapter add).",
)
@click.option(
    "--lora-targets",
    default=None,
    metavar="MODULES",
    help="Comma-separated modules adapters may change (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj;"
    " default: those of --lora's adapters, or all of them).",
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
    head: str | None,
    block_size: str,
    device: str,
    base: str | None,
    context_length: int | None,
    backend: str,
    no_calibration: bool,
    tokenizer: str | None,
    per_tensor: bool,
    quality_texts: str | None,
    force_quality: bool,
    loras: tuple[str, ...],
    lora_rank: int | None,
    lora_targets: str | None,
    no_validate: bool,
    force: bool,
) -> None:
    """Export SOURCE (checkpoint folder, LoRA adapter folder or .gguf file) to the model folder OUT_DIR."""
    from edgeroute.export import export_model
    from edgeroute.export.steps import UNITS

    with Steps("export") as steps:
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
            progress=steps.callback(step_labels(source, quantize), UNITS),
            head=head,
            per_tensor=per_tensor,
            quality_texts=quality_texts,
            force_quality=force_quality,
            lora_rank=lora_rank,
            lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None,
            loras=named_paths(loras, "--lora") or None,
        )
    manifest = json.loads((path / "edgeroute.json").read_text())
    if manifest.get("task") is not None:
        _encoder_summary(source, path, manifest)
        return
    v = manifest["provenance"].get("validation")
    click.echo(
        f"exported {source} -> {path} ({manifest['precision']}, quantisation {manifest['quantization']['method']},"
        f" {manifest['provenance'].get('backend', 'optimum')} graph)"
    )
    for name, entry in manifest.get("adapters", {}).items():
        check = entry.get("validation")
        figures = (
            f"; against PEFT: max |Δlogit| {check['max_abs_logit_diff']:.2e}, top-1 agreement"
            f" {100 * check['top1_agreement']:.1f}%"
            if check
            else ""
        )
        click.echo(f"  adapter {name}: rank {entry.get('rank')}, {', '.join(entry.get('modules', []))}{figures}")
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
        warning = quality_warning(manifest)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        t = v.get("tokenizer")
        if t:
            rate = "n/a" if t["whole_word_rate"] is None else f"{100 * t['whole_word_rate']:.0f}%"
            click.echo(
                f"  tokenizer: round trip {'yes' if t['roundtrip'] else 'no'}; {t['chars_per_token']:.2f} characters"
                f" per token; whole words kept whole {rate} of {t['whole_words']}"
            )


def _encoder_summary(source: str, path: Path, manifest: dict) -> None:
    """What an encoder export wrote: its task, precision, what it answers, validation and int8 quality."""
    v = manifest["provenance"].get("validation")
    if manifest["task"] == "embedding":
        norm = ", normalised" if manifest["normalize"] else ""
        click.echo(
            f"exported {source} -> {path} (embedding, {manifest['precision']}, {manifest['hidden_size']} dimensions,"
            f" {manifest['pooling']} pooling{norm}, at most {manifest['max_length']} tokens)"
        )
        if v:
            click.echo(f"  pooled embeddings' cosine with PyTorch: min {v['min_cosine']:.6f} over {v['texts']} texts")
    else:
        labels = manifest["labels"]
        kind = manifest.get("problem_type") or f"a tag per token, {manifest.get('scheme', 'BIO')}"
        click.echo(
            f"exported {source} -> {path} ({manifest['task']}, {manifest['precision']}, {kind},"
            f" {len(labels)} labels: {', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''})"
        )
        if v:
            click.echo(
                f"  logits' max |difference| with PyTorch {v['max_abs_logit_diff']:.2e}; best labels the same:"
                f" {'yes' if v['same_labels'] else 'no'} over {v['texts']} texts"
            )
    q = manifest["provenance"].get("quality")
    if q:
        names = ("min_cosine", "mean_cosine", "retrieval_agreement", "label_agreement", "entity_f1", "tag_agreement")
        shown = ", ".join(f"{n.replace('_', ' ')} {q[n]:.4f}" for n in names if n in q)
        verdict = "passed" if q["passed"] else "BELOW THE GATE, written with --force-quality"
        click.echo(f"  {manifest['precision']} against fp32 over {q['texts']} texts: {shown} ({verdict})")
        if not q["passed"]:
            click.echo(
                f"warning: this {manifest['precision']} model is below the quality gate (docs/encoders.md)", err=True
            )
