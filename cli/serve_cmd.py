"""``edgeroute serve MODEL``: an OpenAI-compatible HTTP server (the ``serve`` extra)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from .options import model_options, verbose_option


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to bind.")
@click.option(
    "--api-key",
    envvar="EDGEROUTE_API_KEY",
    default=None,
    help="Clients must send 'Authorization: Bearer KEY' (also from $EDGEROUTE_API_KEY); /health stays public.",
)
@click.option("--model-name", default=None, help="The model's id in the API (default: the folder's name).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Requests decoded at once.")
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests waiting for a slot at most; beyond that the server answers 429 with Retry-After.",
)
@model_options
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@verbose_option
def serve(
    model_path: str,
    host: str,
    port: int,
    api_key: str | None,
    model_name: str | None,
    max_batch: int,
    max_queue: int,
    ctx_size: int | None,
    threads: int | None,
    provider: str,
    log_level: str,
) -> None:
    """Serve MODEL (an exported folder) over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions,
    /v1/models, /health and /metrics. Ctrl-C or SIGTERM stops it."""
    try:
        from edgeroute.serve import Settings
        from edgeroute.serve import serve as run_server
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    if api_key == "":
        raise click.BadParameter("is empty", param_hint="--api-key")
    if not is_loopback(host) and not api_key:
        click.echo(
            f"edgeroute: warning: serving on {host} without an API key: anyone who can reach it can use it"
            " (set --api-key or EDGEROUTE_API_KEY)",
            err=True,
        )
    name = model_name or Path(model_path).resolve().name
    settings = Settings(model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    run_server(
        model_path,
        settings,
        host=host,
        port=port,
        provider=provider,
        threads=threads,
        context_size=ctx_size,
        log_level=log_level,
    )
