"""``edgeroute info MODEL``: what a model folder holds and what this machine can run it on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import edgeroute as er

from .options import verbose_option


def describe(path: str) -> dict[str, Any]:
    """What the folder holds, after checking its files: present, inside the folder, and (where the export
    recorded them) of the recorded sizes and SHA-256 hashes; a bad file raises ``ModelLoadError`` naming it."""
    from edgeroute.manifest import check_files
    from edgeroute.tokenizer import Tokenizer

    m = er.Manifest.load(path)
    check_files(path, m, hashes=True)
    prov = dict(m.provenance)
    val = prov.get("validation") or {}
    graph = Path(path) / m.graph
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.name.startswith(m.graph))
    tokens = Tokenizer.from_folder(path).vocab_size
    return {
        "path": str(Path(path).resolve()),
        "architecture": prov.get("architecture", "?"),
        "model_type": prov.get("model_type", "?"),
        "parameters": prov.get("parameters"),
        "source": prov.get("source"),
        "precision": m.precision,
        "quantization": dict(m.quantization),
        "kv_dtype": m.kv_dtype,
        "kv_layout": m.kv_layout,
        "backend": prov.get("backend", "optimum"),
        "layers": m.num_layers,
        "kv_heads": m.num_kv_heads,
        "head_size": m.head_size,
        "context_length": m.context_length,
        "vocab_size": m.vocab_size,
        "tokenizer_size": tokens,
        "files_verified": sorted(m.files) or None,
        "eos_token_ids": list(m.eos_token_ids),
        "chat_template": m.chat_template is not None,
        "generation_defaults": dict(m.generation_defaults),
        "graph": graph.name,
        "graph_bytes": size,
        "parity": {k: val[k] for k in ("max_abs_logit_diff", "greedy_identical", "greedy_tokens") if k in val},
        "quality": val.get("quality"),
        "providers_available": er.available_providers(),
        "versions": prov.get("versions", {}),
    }


_LAYOUTS = {
    "shared": "one in-place buffer per layer (run's --ctx-size sets its length; default 4096 at most)",
    "concat": "grown by concatenation each step",
}


def nodes_line(counts: dict[str, int], provider: str) -> tuple[str, str | None]:
    """The ``nodes`` line of ``edgeroute info --provider``, and a warning when a session on another provider ran
    nodes on the CPU (onnxruntime's silent fallback for a node that has no kernel there)."""
    total = sum(counts.values())
    shown = ", ".join(f"{n} on {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    line = f"nodes         {shown} (as onnxruntime placed them on {provider})"
    fallback = counts.get("CPUExecutionProvider", 0)
    if provider != "cpu" and fallback:
        return line, f"{fallback} of {total} nodes ran on the CPU provider, not {provider}: they copy their inputs"
    return line, None


def _placement(model_path: str, provider: str) -> dict[str, int]:
    """Nodes per execution provider of the folder's graph on ``provider``, without the load-time refusal of compute
    nodes on the CPU (this is the command that reports them)."""
    from edgeroute.session import create_session, node_counts

    folder = Path(model_path)
    return node_counts(create_session(folder / er.Manifest.load(folder).graph, provider, threads=1, check=False))


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Also load the graph on this provider and count the nodes each provider runs (a CUDA graph's CPU"
    " fallbacks show).",
)
@verbose_option
def info(model_path: str, as_json: bool, provider: str | None) -> None:
    """Describe the exported model folder MODEL."""
    from edgeroute.encoder import is_encoder_folder

    if is_encoder_folder(model_path):
        _info_encoder(model_path, as_json, provider)
        return
    d = describe(model_path)
    warning = None
    if provider is not None:
        d["node_providers"] = _placement(model_path, provider)
        line, warning = nodes_line(d["node_providers"], provider)
        if warning:
            d["node_provider_warning"] = warning
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    params = f"{d['parameters'] / 1e6:.1f}M" if d["parameters"] else "?"
    q = d["quantization"]
    qtext = q.get("method", "none") + (f" (block {q['block_size']})" if "block_size" in q else "")
    lines = [
        f"model         {d['path']}",
        f"architecture  {d['architecture']} ({d['model_type']}), {params} parameters",
        f"precision     {d['precision']}, quantisation {qtext}, KV cache {d['kv_dtype']}",
        f"geometry      {d['layers']} layers, {d['kv_heads']} KV heads x {d['head_size']}",
        f"graph form    {d['backend']} backend, KV cache {_LAYOUTS[d['kv_layout']]}",
        f"context       {d['context_length']} tokens; vocabulary {d['vocab_size']}; EOS {d['eos_token_ids']}",
        f"tokenizer     {d['tokenizer_size']} tokens"
        + (
            f" (graph ids {d['tokenizer_size']}..{d['vocab_size'] - 1} have no text: never generated)"
            if d["tokenizer_size"] < d["vocab_size"]
            else ""
        ),
        f"chat template {'yes' if d['chat_template'] else 'no'}",
        f"graph         {d['graph']} ({d['graph_bytes'] / 2**20:.1f} MiB with weights)",
        "files         "
        + (
            f"{len(d['files_verified'])} checked against the export's sizes and SHA-256"
            if d["files_verified"]
            else "present (this export recorded no hashes to check them against)"
        ),
        f"defaults      {d['generation_defaults'] or 'none (edgeroute defaults)'}",
    ]
    p = d["parity"]
    if p:
        greedy = (
            f", greedy {p['greedy_tokens']} tokens identical: {'yes' if p['greedy_identical'] else 'no'}"
            if "greedy_identical" in p
            else ""
        )
        lines.append(f"parity        max |Δlogit| {p['max_abs_logit_diff']:.2e} vs PyTorch{greedy}")
    if d["quality"]:
        qq = d["quality"]
        lines.append(
            f"quality       top-1 agreement {100 * qq['top1_agreement']:.1f}%, perplexity "
            f"{qq['perplexity']:.3f} vs {qq['perplexity_reference']:.3f} "
            f"({qq['perplexity_change_pct']:+.2f}%)"
        )
    lines.append(f"providers     {', '.join(d['providers_available'])} available on this machine")
    if provider is not None:
        lines.append(line)
    click.echo("\n".join(lines))
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _info_encoder(model_path: str, as_json: bool, provider: str | None) -> None:
    """``info`` of an encoder folder: its task, what it gives (dimensions and pooling, or labels) and maximum length
    (the model is loaded: its manifest and files are checked)."""
    model = er.EncoderModel.load(model_path, provider or "cpu", threads=1)
    m = model.manifest
    val = (m.get("provenance") or {}).get("validation") or {}
    d = {
        "path": str(Path(model_path).resolve()),
        "task": model.task,
        "architecture": m.get("architecture"),
        "precision": m.get("precision"),
        "dimensions": model.dimension,
        "pooling": model.pooling or None,
        "normalize": model.normalize,
        "labels": model.labels or None,
        "problem_type": model.problem_type or None,
        "scheme": model.scheme if model.task == "token-classification" else None,
        "rerank": model.task == "classification" and len(model.labels) == 1,
        "max_length": model.max_length,
        "quantization": m.get("quantization"),
        "validation": val or None,
        "quality": (m.get("provenance") or {}).get("quality"),
        "providers_available": er.available_providers(),
    }
    if as_json:
        click.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    lines = [f"model         {d['path']}", f"task          {d['task']} ({d['architecture']}, {d['precision']})"]
    if model.task == "embedding":
        norm = ", L2-normalised" if d["normalize"] else ""
        lines.append(f"embedding     {d['dimensions']} dimensions, {d['pooling']} pooling{norm}")
    else:
        kind = model.problem_type or f"a tag per token, {model.scheme}"
        lines.append(f"labels        {', '.join(model.labels)} ({kind})")
        if d["rerank"]:
            lines.append("rerank        yes (one score: a cross-encoder's query-document relevance)")
    lines.append(
        f"inputs        at most {d['max_length']} tokens (longer texts are refused unless cut or run in windows on"
        " request)"
    )
    q: dict[str, Any] | None = d["quality"]  # type: ignore[assignment]
    if q:
        measures = {
            k: v for k, v in q.items() if k in ("min_cosine", "retrieval_agreement", "label_agreement", "entity_f1")
        }
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in measures.items())
        verdict = "passed the gate" if q["passed"] else "BELOW the gate (forced)"
        lines.append(f"{d['precision']} quality  {shown} against fp32 over {q['texts']} texts ({verdict})")
    if "min_cosine" in val:
        lines.append(
            f"validation    pooled cosine with PyTorch {val['min_cosine']:.6f} (min over {val['texts']} texts)"
        )
    elif val:
        lines.append(f"validation    logits' max |difference| with PyTorch {val['max_abs_logit_diff']:.2e}")
    click.echo("\n".join(lines))
