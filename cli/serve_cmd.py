"""``edgeroute serve MODEL``: an OpenAI-compatible HTTP server (the ``serve`` extra)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import click
import edgeroute as er
from edgeroute.prefix_cache import DEFAULT_MEMORY

from .options import (
    cuda_graph_flag,
    model_options,
    named_paths,
    prefix_cache_options,
    prefix_options,
    verbose_option,
)


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
@click.option(
    "--no-prefix-reuse",
    is_flag=True,
    help="Never reuse one request's cached prompt for another (the slots' and the prefix cache's): prefix reuse makes"
    " a shared prefix answer faster, which tells a client what others sent (for mutually untrusting clients).",
)
@click.option(
    "--no-prefix-cache",
    is_flag=True,
    help="Keep no prefix cache: by default a single server keeps prompts' KV blocks in memory (512 MB, or"
    " --prefix-cache-mb) for later prompts that start with them, when the model's graph can (the slots still reuse"
    " their own last prompts).",
)
@click.option(
    "--plain-content",
    is_flag=True,
    help="Tokenise chat message contents as plain text: special-token text in a message stays text instead of"
    " becoming control tokens.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3,
    show_default=True,
    help="Seconds running requests get to finish after Ctrl-C or SIGTERM; then each ends with a 'shutting_down' error.",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds a client has to send a request's headers, and as many for its body; slower clients are cut off"
    " [default: 30].",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Open connections at most; one more is closed as it arrives [default: 256].",
)
@model_options
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=PATH",
    callback=lambda ctx, param, value: _loras(value),
    help="Load a LoRA adapter (a PEFT folder or an adapter file) at start, served as model NAME; repeatable. The"
    " model must take adapters (exported with --lora-rank or --lora).",
)
@click.option(
    "--max-loras",
    type=click.IntRange(min=1),
    default=None,
    help="LoRA adapters loaded at once at most (the folder's, --lora's and those loaded while serving) [default: 16].",
)
@click.option(
    "--allow-adapter-loading",
    is_flag=True,
    help="Answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter without --api-key (with a key they are on):"
    " any client can then make the server read files at paths it names.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Serve as a Ray Serve deployment: replicas of this server behind one endpoint (the ray extra).",
)
@click.option(
    "--replicas", type=click.IntRange(min=1), default=None, help="With --ray: replicas of the model [default: 1]."
)
@click.option(
    "--ray-address",
    default=None,
    help="With --ray: join the Ray cluster at ADDR ('auto', HOST:PORT, ray://HOST:PORT) instead of starting one here.",
)
@click.option(
    "--ray-cpus",
    type=click.IntRange(min=1),
    default=None,
    help="With --ray and no --ray-address: CPUs of the local cluster [default: this machine's].",
)
@click.option(
    "--replica-cpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --ray: CPUs reserved per replica [default: 1]; --threads defaults to it, rounded up.",
)
@click.option(
    "--autoscaling",
    default=None,
    help="With --ray: Ray Serve's autoscaling_config as JSON (min_replicas, max_replicas, ...); replaces --replicas.",
)
@prefix_cache_options
@verbose_option
def serve(
    model_path: str,
    host: str,
    port: int,
    api_key: str | None,
    model_name: str | None,
    max_batch: int,
    max_queue: int,
    no_prefix_reuse: bool,
    no_prefix_cache: bool,
    plain_content: bool,
    grace: float,
    read_timeout: float | None,
    max_connections: int | None,
    ctx_size: int | None,
    threads: int | None,
    provider: str,
    loras: dict[str, str],
    max_loras: int | None,
    allow_adapter_loading: bool,
    log_level: str,
    use_ray: bool,
    replicas: int | None,
    ray_address: str | None,
    ray_cpus: int | None,
    replica_cpus: float | None,
    autoscaling: str | None,
    prefix_cache: str | None,
    prefix_cache_mb: int | None,
    prefix_cache_disk_mb: int | None,
) -> None:
    """Serve MODEL (an exported folder) over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions,
    /v1/models, /health and /metrics. Ctrl-C or SIGTERM stops it.

    LoRA adapters (vLLM's conventions): a request's model names the served model or a loaded adapter;
    --lora loads adapters at start, POST /v1/load_lora_adapter and /v1/unload_lora_adapter while serving.

    With --ray, the same server runs as replicas of a Ray Serve deployment on a local cluster, or on the cluster
    at --ray-address (MODEL's path must exist on every node); --threads is then per replica."""
    ray_only = {
        "--replicas": replicas,
        "--ray-address": ray_address,
        "--ray-cpus": ray_cpus,
        "--replica-cpus": replica_cpus,
        "--autoscaling": autoscaling,
    }
    given = [flag for flag, value in ray_only.items() if value is not None]
    cuda_graph = cuda_graph_flag()
    if cuda_graph and use_ray:
        raise click.UsageError("--cuda-graph is for a single server (not with --ray)")
    if given and not use_ray:
        raise click.UsageError(f"{', '.join(given)} need --ray")
    single = {"--lora": loras, "--max-loras": max_loras, "--allow-adapter-loading": allow_adapter_loading}
    adapters_given = [flag for flag, value in single.items() if value]
    if adapters_given and use_ray:
        raise click.UsageError(f"{', '.join(adapters_given)}: adapters are for a single server (not with --ray)")
    prefix_flags = {"prefix_cache": prefix_cache, "prefix_cache_mb": prefix_cache_mb}
    prefix_flags["prefix_cache_disk_mb"] = prefix_cache_disk_mb
    explicit = [f"--{k.replace('_', '-')}" for k, v in prefix_flags.items() if v is not None]
    if use_ray and explicit:
        raise click.UsageError("--prefix-cache options are for a single server (not with --ray)")
    for flag, on in (("--no-prefix-cache", no_prefix_cache), ("--no-prefix-reuse", no_prefix_reuse)):
        if on and explicit:
            raise click.UsageError(f"{explicit[0]} and {flag} contradict each other: drop one")
    if ray_cpus is not None and ray_address is not None:
        raise click.UsageError("--ray-cpus sizes a local cluster; a cluster at --ray-address has its own CPUs")
    try:
        from edgeroute.serve import Settings
        from edgeroute.serve import serve as run_server
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    _check_key(api_key)
    if not is_loopback(host) and not api_key:
        click.echo(
            f"edgeroute: warning: serving on {host} without an API key: anyone who can reach it can use it"
            " (set --api-key or EDGEROUTE_API_KEY)",
            err=True,
        )
    if allow_adapter_loading and not api_key and not is_loopback(host):
        click.echo(
            "edgeroute: warning: --allow-adapter-loading without an API key: anyone who can reach the server can make"
            " it read files at paths they name",
            err=True,
        )
    name = model_name or Path(model_path).resolve().name
    if name in loras:
        raise click.BadParameter(f"{name!r} is the served model's name: give the adapter another", param_hint="--lora")
    settings = Settings(
        model_name=name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        prefix_reuse=not no_prefix_reuse,
        # a single server's prefix cache in memory unless told otherwise (vLLM's and llama.cpp's servers reuse
        # prompts across requests by default too); the --prefix-cache options size it and refuse a graph that
        # cannot hold one, this default skips such a graph
        prefix_cache_memory=None if no_prefix_cache or no_prefix_reuse or use_ray or explicit else DEFAULT_MEMORY,
        plain_content=plain_content,
        adapters=dict(loras),
        # on Ray each replica would load alone: the routes are off there
        allow_adapter_loading=True if allow_adapter_loading else (False if use_ray else None),
    )
    if read_timeout is not None:
        settings.read_timeout = read_timeout
    if max_connections is not None:
        settings.max_connections = max_connections
    where: dict[str, Any] = {
        "host": host,
        "port": port,
        "provider": provider,
        "threads": threads,
        "context_size": ctx_size,
    }
    if cuda_graph:
        where["cuda_graph"] = True
    if use_ray:
        _serve_on_ray(
            model_path,
            settings,
            **where,
            address=ray_address,
            ray_cpus=ray_cpus,
            replicas=replicas or 1,
            cpus_per_replica=replica_cpus or 1.0,
            autoscaling_config=_autoscaling(autoscaling),
        )
        return
    load_options = {"max_adapters": max_loras} if max_loras is not None else {}
    load_options.update(prefix_options(prefix_flags))
    run_server(model_path, settings, **where, grace=grace, log_level=log_level, load_options=load_options)


def _loras(values: tuple[str, ...]) -> dict[str, str]:
    """``--lora NAME=PATH`` values -> {name: path}: a name the server can serve, given once, and a path that exists
    (whether it holds an adapter that fits is checked when the model is loaded)."""
    from edgeroute.adapters import check_name

    out = named_paths(values, "--lora")
    for name, path in out.items():
        try:
            check_name(name)
        except er.ConfigError as e:
            raise click.BadParameter(f"{name!r}: {e.reason}", param_hint="--lora") from None
        if not Path(path).expanduser().exists():
            raise click.BadParameter(f"{name}={path}: no such file or folder", param_hint="--lora")
    return out


def _check_key(api_key: str | None) -> None:
    """An API key a client can send: not empty (an empty $EDGEROUTE_API_KEY is not "no key"), no surrounding
    whitespace (an HTTP client strips it from the header, so it would never match), printable ASCII."""
    given = os.environ.get("EDGEROUTE_API_KEY") if api_key is None else api_key
    source = click.get_current_context().get_parameter_source("api_key")
    hint = "--api-key" if source == click.core.ParameterSource.COMMANDLINE else "$EDGEROUTE_API_KEY"
    if given is None:
        return
    if not given:
        raise click.BadParameter("is empty: give a key, or unset it to serve without one", param_hint=hint)
    if given != given.strip():
        raise click.BadParameter("has leading or trailing whitespace, which no client's header keeps", param_hint=hint)
    if not all(" " < ch <= "~" for ch in given):
        raise click.BadParameter("must be printable ASCII, no spaces (it is sent in an HTTP header)", param_hint=hint)


def _autoscaling(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"is not JSON: {e.msg} at character {e.pos}", param_hint="--autoscaling") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, such as '{\"max_replicas\": 4}'", param_hint="--autoscaling")
    return value


def _serve_on_ray(model_path: str, settings: Any, **kwargs: Any) -> None:
    try:
        from edgeroute.serve import ray as on_ray
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    try:
        on_ray.run(model_path, settings, announce=lambda line: click.echo(line, err=True), **kwargs)
    except on_ray.RayServeError as e:
        raise click.ClickException(str(e)) from None
