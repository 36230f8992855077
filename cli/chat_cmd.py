"""``edgeroute chat MODEL``: an interactive conversation that keeps the KV cache between turns."""

from __future__ import annotations

import sys
from typing import Any

import click
import edgeroute as er

from .options import (
    PREFIX_PARAMS,
    build_config,
    constraint_options,
    generation_options,
    load_model,
    model_options,
    prefix_cache_options,
    prefix_options,
    sampling_options,
    verbose_option,
)
from .run_cmd import decode_input

HELP = "commands: /reset (forget the conversation, keep the system message), /system TEXT (set it), /exit"


def _read(interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D). A line that is not UTF-8 raises ``ConfigError``."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
        except UnicodeDecodeError as e:
            raise er.ConfigError("prompt", e.object[:16], "the line is not valid UTF-8") from None
    line = sys.stdin.buffer.readline()
    return None if line == b"" else decode_input(line, "the line").rstrip("\r\n")


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--system", default=None, help="System message for the conversation.")
@generation_options
@constraint_options
@sampling_options
@prefix_cache_options
@model_options
@verbose_option
def chat(
    model_path: str, system: str | None, provider: str, threads: int | None, ctx_size: int | None, **flags: Any
) -> None:
    """Chat with MODEL. Ctrl-C stops an answer; Ctrl-C again (or Ctrl-D, or /exit) leaves."""
    cache = prefix_options({n: flags.pop(n) for n in PREFIX_PARAMS})
    model = load_model(model_path, provider, threads, ctx_size=ctx_size, options=cache)
    session = er.ChatSession(model, build_config(model, flags), system)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"edgeroute chat: {model_path} ({HELP})", err=True)
    while True:
        try:
            line = _read(interactive)
        except KeyboardInterrupt:
            click.echo("", err=True)
            break
        except er.ConfigError as e:
            click.echo(f"edgeroute: error: {e}; skipped", err=True)
            continue
        if line is None or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            click.echo("[conversation reset]", err=True)
            continue
        if text.startswith("/system"):
            session.set_system(text[len("/system") :].strip())
            click.echo(f"[system message {'set' if session.system else 'cleared'}]", err=True)
            continue
        if text.startswith("/"):
            click.echo(f"[unknown command {text.split()[0]}; {HELP}]", err=True)
            continue
        try:
            for step in session.send(text):
                if step.text:
                    click.echo(step.text, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n[stopped]", err=True)
            continue
        except (er.ContextOverflowError, er.ConfigError) as e:  # this turn's input: the conversation goes on
            click.echo(f"edgeroute: error: {e}", err=True)
            continue
        click.echo()
