"""``edgeroute eval MODEL``: sweep router settings, measure diversity against quality, write JSON/CSV/PNG."""

from __future__ import annotations

import functools
import json
from typing import Any

import click
import edgeroute as er

from .options import constraint_options, constraint_params, load_model, model_options, verbose_option
from .progress import Steps

DEFAULT_SWEEP = "temperature=0.7,1.0,1.3"
COLUMNS = (
    ("distinct_1", "dist-1", 3),
    ("distinct_2", "dist-2", 3),
    ("distinct_3", "dist-3", 3),
    ("self_bleu4", "sBLEU4", 3),
    ("repetition4", "rep-4", 3),
    ("perplexity", "ppl", 2),
    ("mean_length", "len", 1),
    ("validity", "valid", 2),
)


def _cell(fig: dict[str, Any] | None, digits: int) -> str:
    if not fig or fig["value"] is None:
        return "-"
    half = (fig["high"] - fig["low"]) / 2 if fig["low"] is not None and fig["high"] is not None else 0.0
    return f"{fig['value']:.{digits}f}±{half:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """The terminal table: one row per setting (value ± half the 95% interval), the reference last."""
    shown = [c for c in COLUMNS if any(c[0] in s["figures"] for s in report["settings"])]
    head = ["family", "setting", *[c[1] for c in shown], "gated", "tok/s", "s"]
    rows = []
    for s in report["settings"]:
        gated = s.get("gated_share")
        tps = s.get("tokens_per_second")
        rows.append(
            [s["family"], s["label"]]
            + [_cell(s["figures"].get(c[0]), c[2]) for c in shown]
            + ["-" if gated is None else f"{gated:.0%}", "-" if tps is None else f"{tps:.1f}", f"{s['seconds']:.1f}"]
        )
    if report.get("reference"):
        ref = report["reference"]
        rows.append(["reference", "human text"] + [_cell(ref.get(c[0]), c[2]) for c in shown] + ["-", "-", "-"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in [head, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@click.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="SPEC",
    help="A family of settings: '[NAME:] key=v1,v2,... key2=v ...' (request parameters; the keys with several"
    f" values are swept, as a product). Repeatable. Default: '{DEFAULT_SWEEP}'.",
)
@click.option("--sweep-file", type=click.Path(), default=None, help="Sweeps, one per line ('#' comments).")
@click.option("--base", default=None, metavar="SPEC", help="Parameters every setting starts from: 'key=v key2=v'.")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None, help="Prompts, one per line or JSONL.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Samples per prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the first sample.")
@click.option("--judge", default=None, type=click.Path(), help="Model folder whose perplexity measures quality.")
@click.option("--reference", type=click.Path(), default=None, help="Human texts (one per line or JSONL 'text').")
@click.option("--chat/--no-chat", default=None, help="Apply the chat template (default: when the model has one).")
@click.option("--out", type=click.Path(), default=None, help="Write eval.json, eval.csv and the PNGs here.")
@click.option("--no-plots", is_flag=True, help="With --out: no PNGs (no matplotlib needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Requests generated at once.")
@click.option(
    "--choices",
    "choices_file",
    type=click.Path(),
    default=None,
    help="Multiple-choice items (JSONL: context, choices, answer): report acc and acc_norm as lm-eval does"
    " instead of sweeping.",
)
@click.option("--delimiter", default=" ", show_default=True, help="With --choices: put between context and choice.")
@constraint_options
@model_options
@verbose_option
def eval_cmd(
    model_path: str,
    sweeps: tuple[str, ...],
    sweep_file: str | None,
    base: str | None,
    prompts_file: str | None,
    num_prompts: int | None,
    samples: int,
    max_new_tokens: int,
    seed: int,
    judge: str | None,
    reference: str | None,
    chat: bool | None,
    out: str | None,
    no_plots: bool,
    as_json: bool,
    batch: int,
    choices_file: str | None,
    delimiter: str,
    provider: str,
    threads: int | None,
    ctx_size: int | None,
    **flags: Any,
) -> None:
    """Measure how router settings trade diversity for quality on MODEL (an exported folder)."""
    from edgeroute import eval as ev

    if choices_file is not None:
        if sweeps or sweep_file or base or prompts_file or constraint_params(flags):
            raise click.UsageError("--choices scores a multiple-choice file: give no sweep, prompts or constraint")
        _choices(choices_file, delimiter, model_path, provider, threads, ctx_size, num_prompts, out, as_json)
        return
    specs = list(sweeps) + (ev.read_sweep_file(sweep_file) if sweep_file else [])
    settings = ev.parse_sweeps(specs or [DEFAULT_SWEEP])
    base_params = dict(ev.parse_sweep(base)[0].params) if base else {}
    if any(isinstance(v, list) for v in base_params.values()):
        raise click.BadParameter("give one value per key", param_hint="--base")
    base_params.update(constraint_params(flags))
    prompts = ev.read_texts(prompts_file) if prompts_file else [p for _, p in ev.PROMPTS]
    prompts = prompts[:num_prompts] if num_prompts else prompts
    ref = ev.read_texts(reference, "text") if reference else None
    ev.require(plots=bool(out) and not no_plots, constraint=bool(constraint_params(flags)))
    model = load_model(model_path, provider, threads, ctx_size=ctx_size)
    judge_model = load_model(judge, provider, threads, spin=False) if judge else None

    @functools.cache
    def load(path: str) -> er.Model:
        return load_model(path, provider, threads, spin=False, ctx_size=model.context_length)

    ev.setting_configs(settings, base_params, max_new_tokens, load)  # every setting checked before the long work

    total = len(settings) * len(prompts) * samples
    with Steps("eval") as steps:
        steps.start(f"measuring {len(settings)} settings", total=total, unit="samples")
        report = ev.evaluate(
            model,
            settings,
            prompts,
            samples=samples,
            max_new_tokens=max_new_tokens,
            seed=seed,
            judge=judge_model,
            reference=ref,
            chat=chat,
            base=base_params,
            load=load,
            progress=steps.advance,
            max_batch=batch,
        )
    data = report.as_dict()
    if out:
        written = report.write(out)
        if not no_plots:
            from edgeroute.eval import write_plots

            written += write_plots(data, out)
        for path in written:
            click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
    else:
        click.echo(table(data))
        click.echo(
            f"{data['prompts']} prompts x {data['samples']} samples per setting, seeds {data['seeds']['first']}.."
            f"{data['seeds']['last']}, judge {data['judge']}, 95% bootstrap intervals over prompts;"
            f" {data['seconds']:.1f} s"
        )


def _choices(
    path: str,
    delimiter: str,
    model_path: str,
    provider: str,
    threads: int | None,
    ctx_size: int | None,
    limit: int | None,
    out: str | None,
    as_json: bool,
) -> None:
    """``edgeroute eval MODEL --choices FILE``: acc and acc_norm of a multiple-choice file (lm-eval's figures)."""
    from pathlib import Path

    from edgeroute.eval.choices import evaluate_choices, read_items

    items = read_items(path)[:limit] if limit else read_items(path)
    model = load_model(model_path, provider, threads, ctx_size=ctx_size)
    with Steps("eval") as steps:
        steps.start(f"scoring {len(items)} items", total=len(items), unit="items")
        data = evaluate_choices(model, items, delimiter, progress=steps.advance).as_dict()
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "choices.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(target)  # never half-written
        click.echo(f"wrote {target}", err=True)
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
        return
    for name in ("acc", "acc_norm"):
        fig = data[name]
        click.echo(f"{name:<9}{fig['value']:.4f} ± {fig['stderr']:.4f}")
    click.echo(f"{data['items']} items in {data['seconds']:.1f} s ({data['items_per_second']:.2f} items/s)")
