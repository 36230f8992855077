"""``edgeroute run MODEL [PROMPT | -]``: generate and stream to stdout, or print JSON per sample."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import edgeroute as er
from edgeroute.encoder import is_encoder_folder

from .encoder_run import ENCODER_PARAMS, encoder_options, run_encoder
from .options import (
    PREFIX_PARAMS,
    build_request,
    constraint_options,
    flow_options,
    generation_options,
    load_model,
    model_options,
    needs_second_model,
    prefix_cache_options,
    prefix_options,
    sampling_options,
    verbose_option,
)


def read_prompt(prompt: str | None) -> str:
    """PROMPT, or standard input for '-'. Either is checked by the library alike (a prompt must give a token)."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or '-' to read it from standard input")
        return decode_input(sys.stdin.buffer.read(), "standard input")
    return prompt


def decode_input(data: bytes, where: str) -> str:
    """``data`` as UTF-8; a ``ConfigError`` naming the first bad byte otherwise (nothing is guessed or replaced)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise er.ConfigError(
            "prompt", data[max(e.start - 8, 0) : e.end + 8], f"{where} is not valid UTF-8 (byte {e.start})"
        ) from None


def prompt_ids(model: er.Model, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        if system:
            raise click.UsageError("--system needs --chat")
        return model.encode_prompt(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return model.tokenizer.apply_chat_template(messages)


def completion_json(c: er.Completion, sample: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sample": sample,
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "usage": {
            "prompt_tokens": c.usage.prompt_tokens,
            "completion_tokens": c.usage.completion_tokens,
            "time_to_first_token": c.usage.time_to_first_token,
            "tokens_per_second": c.usage.tokens_per_second,
        },
    }
    if c.usage.draft_proposed:
        out["usage"]["draft_proposed"] = c.usage.draft_proposed
        out["usage"]["draft_accepted"] = c.usage.draft_accepted
    if c.usage.flow_steps:
        out["usage"]["flow_steps"] = c.usage.flow_steps
        out["usage"]["flow_skipped"] = c.usage.flow_skipped
        out["usage"]["flow_runs"] = c.usage.flow_runs
    if c.logprobs is not None:
        out["logprobs"] = [
            {"token_id": lp.token_id, "logprob": lp.logprob, "top": [{"token_id": i, "logprob": v} for i, v in lp.top]}
            for lp in c.logprobs
        ]
    return out


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("prompt", required=False)
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option(
    "-n",
    "samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Number of samples (sample i uses seed+i when --seed is given).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per sample instead of streaming.")
@click.option(
    "--beams",
    "num_beams",
    type=click.IntRange(min=1),
    default=None,
    help="Beam search with B hypotheses (transformers' semantics); -n N returns the N best with their scores.",
)
@click.option("--length-penalty", type=float, default=None, help="Beam scores: sum log p / length ** this (1.0).")
@click.option(
    "--early-stopping",
    type=click.Choice(["false", "true", "never"]),
    default=None,
    help="When beam search stops (transformers' early_stopping; default false).",
)
@encoder_options
@generation_options
@constraint_options
@sampling_options
@flow_options
@prefix_cache_options
@model_options
@verbose_option
def run(
    model_path: str,
    prompt: str | None,
    chat: bool,
    system: str | None,
    samples: int,
    as_json: bool,
    num_beams: int | None,
    length_penalty: float | None,
    early_stopping: str | None,
    provider: str,
    threads: int | None,
    ctx_size: int | None,
    **flags: Any,
) -> None:
    """Generate from MODEL (an exported folder) for PROMPT, or for standard input with '-'. An encoder model
    answers by its task: a token classifier its entities, a classifier its labels and scores, an embedding model
    a summary of PROMPT's embedding (the whole vector with --json); --input FILE runs a JSONL file of inputs."""
    ctx = click.get_current_context()
    given = [n for n in ctx.params if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    encoder_flags = {n: flags.pop(n) for n in ENCODER_PARAMS}
    if is_encoder_folder(model_path):
        shared = ("model_path", "prompt", "as_json", "provider", "threads", "verbose", "samples", *ENCODER_PARAMS)
        other = [n for n in given if n not in shared]
        if other:
            raise click.UsageError(
                f"--{other[0].replace('_', '-')} is a generation option: {model_path} is an encoder model"
            )
        if encoder_flags["input_file"] is not None and prompt is not None:
            raise click.UsageError("give a PROMPT or --input FILE, not both")
        text = None if encoder_flags["input_file"] is not None else read_prompt(prompt)
        encoder = er.EncoderModel.load(model_path, provider, threads)
        run_encoder(encoder, text, as_json, {**encoder_flags, "samples": samples})
        return
    mine = [n for n in given if n in ENCODER_PARAMS]
    if mine:
        raise click.UsageError(f"--{mine[0].replace('_', '-')} is for encoder models ({model_path} is a decoder)")
    text = read_prompt(prompt)
    cache = prefix_options({n: flags.pop(n) for n in PREFIX_PARAMS})
    model = load_model(model_path, provider, threads, not needs_second_model(flags), ctx_size, cache)
    beams = {}
    if num_beams is not None and num_beams > 1:
        stopping = {"false": False, "true": True, "never": "never"}.get(early_stopping or "false")
        beams = {"num_beams": num_beams, "num_return_sequences": samples, "early_stopping": stopping}
        if length_penalty is not None:
            beams["length_penalty"] = length_penalty
    elif length_penalty is not None or early_stopping is not None:
        raise click.UsageError("--length-penalty and --early-stopping need --beams B (B > 1)")
    config, flows = build_request(model, {**flags, **beams}, provider, threads)
    ids = prompt_ids(model, text, chat, system)
    if beams:
        comp = model.generate(ids, config, flows)
        if as_json:
            out = completion_json(comp, 0)
            out["score"] = comp.score
            out["sequences"] = [
                {"text": h.text, "token_ids": h.token_ids, "finish_reason": h.finish_reason, "score": h.score}
                for h in comp.sequences or ()
            ]
            click.echo(json.dumps(out, ensure_ascii=False))
        else:
            click.echo("\n\n".join(h.text for h in comp.sequences or ()))
        return
    seed = config.sampling.seed
    for i in range(samples):
        cfg = config if seed is None else config.replace(sampling=config.sampling.replace(seed=seed + i))
        gen = model.generator(cfg, flows)
        gen.append(ids)
        if as_json:
            click.echo(json.dumps(completion_json(gen.run(), i), ensure_ascii=False))
            continue
        if i:
            click.echo("\n")
        for step in gen:
            if step.text:
                click.echo(step.text, nl=False)
                sys.stdout.flush()
        click.echo()
        if cfg.want_logprobs:
            comp = gen.completion()
            for lp in comp.logprobs or []:
                alts = " ".join(f"{model.tokenizer.decode([t], False)!r}:{v:.3f}" for t, v in lp.top)
                click.echo(f"{model.tokenizer.decode([lp.token_id], False)!r}\t{lp.logprob:.4f}\t{alts}", err=True)
