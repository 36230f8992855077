"""Option stacks shared by the commands, and turning flags into configs.

Defaults come from the model's manifest (the checkpoint's generation defaults), then edgeroute's own; a flag
given on the command line always wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import edgeroute as er

F = Callable[..., Any]


def verbose_option(f: F) -> F:
    """``--verbose`` on every command (also accepted before the command)."""
    return click.option(
        "--verbose", is_flag=True, expose_value=False, help="Show the full traceback when something fails."
    )(f)


def model_options(f: F) -> F:
    f = click.option(
        "--ctx-size",
        type=click.IntRange(min=1),
        default=None,
        help="Most tokens a sequence may hold (prompt + generated); shared-KV-buffer models reserve this much"
        " (default: the model's context, at most 4096 for them).",
    )(f)
    f = click.option(
        "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: all cores)."
    )(f)
    f = click.option(
        "--provider",
        type=click.Choice(["cpu", "cuda"]),
        default="cpu",
        show_default=True,
        help="Execution provider; never falls back silently.",
    )(f)
    f = click.option(
        "--cuda-graph",
        is_flag=True,
        expose_value=False,
        callback=_remember_cuda_graph,
        help="With --provider cuda: capture each decode step once and replay it (onnxruntime's CUDA graphs; a"
        " fused export, whose KV cache then stays on the GPU).",
    )(f)
    return f


_CUDA_GRAPH = "edgeroute.cuda_graph"


def _remember_cuda_graph(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta[_CUDA_GRAPH] = value


SAMPLING_FLAGS = [
    ("temperature", float, "Temperature; 0 = greedy."),
    ("top_k", int, "Keep the k most likely tokens; 0 = off."),
    ("top_p", float, "Nucleus mass in (0, 1]; 1 = off."),
    ("min_p", float, "Drop tokens below min_p x the top probability; 0 = off."),
    ("typical_p", float, "Locally typical mass in (0, 1]; 1 = off."),
    ("min_keep", int, "Every truncation keeps at least this many tokens."),
    ("repetition_penalty", float, "HF multiplicative repetition penalty; 1 = off."),
    ("presence_penalty", float, "OpenAI additive presence penalty in [-2, 2]."),
    ("frequency_penalty", float, "OpenAI additive frequency penalty in [-2, 2]."),
    ("penalty_last_n", int, "Penalties look at the last N tokens; -1 = all, 0 = off."),
    ("explore", float, "Exploration q: p' = q*uniform + (1-q)*p over allowed tokens."),
    ("explore_end", float, "The value q moves to under the schedule."),
    ("explore_steps", int, "Steps over which q moves to --explore-end."),
    ("seed", int, "Seed of the request's random generator (same seed, same tokens)."),
]


def sampling_options(f: F) -> F:
    f = click.option(
        "--logit-bias",
        "logit_bias",
        multiple=True,
        metavar="TOKEN=BIAS",
        help="Add BIAS (in [-100, 100]) to TOKEN: an id, or text (every token of it; quote text that looks like a"
        " number: '\"42\"=5'); BIAS -inf or 'ban' bans it. Repeatable, one bias per token.",
    )(f)
    f = click.option(
        "--explore-schedule",
        type=click.Choice(["constant", "linear", "exponential"]),
        default=None,
        help="How q moves from --explore to --explore-end.",
    )(f)
    for name, typ, text in reversed(SAMPLING_FLAGS):
        f = click.option("--" + name.replace("_", "-"), name, type=typ, default=None, help=text)(f)
    return f


def prefix_cache_options(f: F) -> F:
    """The prefix cache (``Model.load``'s ``prefix_cache``): prompts' KV positions kept for later prompts."""
    f = click.option(
        "--prefix-cache-disk-mb",
        type=click.IntRange(min=1),
        default=None,
        help="With --prefix-cache: the most megabytes the directory holds (default 8192; least recently used"
        " files go first).",
    )(f)
    f = click.option(
        "--prefix-cache-mb",
        type=click.IntRange(min=1),
        default=None,
        help="The prefix cache's memory budget in megabytes (default 512); alone, a cache in memory only.",
    )(f)
    f = click.option(
        "--prefix-cache",
        type=click.Path(file_okay=False),
        default=None,
        metavar="DIR",
        help="Keep prompts' KV positions in memory and in DIR, reused by later prompts that start with them, across"
        " restarts (verified against the model and the exact tokens before use).",
    )(f)
    return f


PREFIX_PARAMS = ("prefix_cache", "prefix_cache_mb", "prefix_cache_disk_mb")


def prefix_options(flags: dict[str, Any]) -> dict[str, Any]:
    """``Model.load``'s prefix cache options from :func:`prefix_cache_options`' flags."""
    directory, memory, disk = flags.get("prefix_cache"), flags.get("prefix_cache_mb"), flags.get("prefix_cache_disk_mb")
    if disk is not None and directory is None:
        raise click.BadParameter(
            "sizes the cache directory: add --prefix-cache DIR", param_hint="--prefix-cache-disk-mb"
        )
    if directory is None and memory is None:
        return {}
    out: dict[str, Any] = {"prefix_cache": directory if directory is not None else True}
    if memory is not None:
        out["prefix_cache_memory"] = memory << 20
    if disk is not None:
        out["prefix_cache_disk"] = disk << 20
    return out


def generation_options(f: F) -> F:
    f = click.option(
        "--adapter",
        default=None,
        metavar="NAME|PATH",
        help="Run on a LoRA adapter: one the model folder lists (edgeroute adapter list), or a PEFT adapter folder"
        " loaded for this run (the model needs adapter inputs: export --lora-rank).",
    )(f)
    f = click.option(
        "--logprobs",
        type=click.IntRange(0, 20),
        default=None,
        help="Report log-probabilities: the chosen token and N alternatives.",
    )(f)
    f = click.option("--stop", multiple=True, help="Stop string (repeatable); never part of the output.")(f)
    f = click.option(
        "--min-new-tokens",
        type=click.IntRange(min=0),
        default=None,
        help="Suppress end-of-sequence until this many tokens were generated.",
    )(f)
    f = click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Most tokens to generate (default: the model's, else 256).",
    )(f)
    return f


def constraint_options(f: F) -> F:
    """Structured output: the text of each turn follows a JSON Schema, a regex or a grammar."""
    f = click.option(
        "--grammar",
        default=None,
        metavar="FILE",
        help="The text follows this grammar: Lark (llguidance's dialect), or llama.cpp's GBNF for a .gbnf file.",
    )(f)
    f = click.option("--regex", default=None, metavar="PATTERN", help="The text matches this regular expression.")(f)
    f = click.option(
        "--schema",
        default=None,
        metavar="FILE|JSON",
        help="The text is JSON valid against this JSON Schema (a file, or the schema itself).",
    )(f)
    return f


def constraint_params(flags: dict[str, Any]) -> dict[str, Any]:
    """The constraint flags as request parameters: files read, a schema given inline parsed by the library."""
    out: dict[str, Any] = {}
    schema, regex, grammar = flags.get("schema"), flags.get("regex"), flags.get("grammar")
    if schema is not None:
        text = schema.strip()
        if not text.startswith(("{", "[")) and text not in ("true", "false"):
            text = _read(schema, "--schema")
        out["schema"] = text
    if regex is not None:
        out["regex"] = regex
    if grammar is not None:
        out["grammar"] = _read(grammar, "--grammar")
        out["grammar_syntax"] = "gbnf" if grammar.lower().endswith(".gbnf") else "lark"
    return out


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise click.BadParameter(f"cannot read {path!r}: {reason}", param_hint=flag) from None


def flow_options(f: F) -> F:
    """Level-1 routing: speculative decoding, guidance, contrast, and the gate of the last two."""
    f = click.option(
        "--gate-signal",
        type=click.Choice(["margin", "entropy"]),
        default=None,
        help="What the gate reads: 1 - (p1 - p2) (margin, default) or the entropy in nats.",
    )(f)
    f = click.option(
        "--gate-width",
        type=click.FloatRange(min=0),
        default=None,
        metavar="WIDTH",
        help="Soft gate: the mix weight ramps from 0 to 1 over this width of the signal around --gate; 0 = hard.",
    )(f)
    f = click.option(
        "--gate",
        "gate_threshold",
        type=float,
        default=None,
        metavar="THETA",
        help="Gate guidance/contrast: mix the second flow only at steps whose gate signal exceeds THETA; the"
        " others use the model alone and skip the second flow (-inf = always mix, inf = never).",
    )(f)
    f = click.option(
        "--contrast-alpha",
        type=click.FloatRange(0, 10),
        default=0.5,
        show_default=True,
        help="Weight of the small model in contrastive decoding.",
    )(f)
    f = click.option(
        "--contrast",
        "contrast",
        type=click.Path(),
        default=None,
        metavar="PATH",
        help="Contrastive decoding against this smaller model (same tokenizer).",
    )(f)
    f = click.option("--negative-prompt", default=None, help="Context of the guidance's second stream.")(f)
    f = click.option(
        "--guidance",
        type=float,
        default=None,
        metavar="W",
        help="Classifier-free guidance weight: u + W (c - u); 1 = off.",
    )(f)
    f = click.option(
        "--draft-k",
        type=_DraftK(),
        default="4",
        show_default=True,
        metavar="K|auto",
        help="Draft tokens per speculative round; 'auto' adapts to the acceptance rate.",
    )(f)
    f = click.option(
        "--draft",
        default=None,
        metavar="PATH|ngram",
        help="Speculative decoding with this draft model (same tokenizer) or prompt lookup.",
    )(f)
    return f


class _DraftK(click.ParamType):
    """A positive integer or 'auto' (a usage error otherwise)."""

    name = "K|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if text == "auto" or (text.isdigit() and int(text) >= 1):
            return text if text == "auto" else int(text)
        self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)


def flow_params(flags: dict[str, Any]) -> dict[str, Any]:
    """The flow flags as request parameters (popped from ``flags``); the defaults of unused ones are dropped."""
    names = (
        "draft",
        "draft_k",
        "guidance",
        "negative_prompt",
        "contrast",
        "gate_threshold",
        "gate_width",
        "gate_signal",
    )
    out = {k: flags.pop(k, None) for k in names}
    alpha = flags.pop("contrast_alpha", None)
    if out["draft"] is None:
        out.pop("draft_k")
    if out["contrast"] is not None:
        out["contrast_alpha"] = alpha
    return out


_ID = re.compile(r"[+-]?\d+")


def parse_logit_bias(items: tuple[str, ...], tokenizer: er.Tokenizer) -> dict[int, float]:
    """``TOKEN=BIAS`` items -> ``{id: bias}``. TOKEN is an id when it is an integer (a negative one is an error),
    else text, every token of it (``"..."`` quotes text that looks like a number). Two items that give one token
    different biases are an error: which one is meant cannot be guessed."""
    out: dict[int, float] = {}
    given: dict[int, str] = {}
    for item in items:
        token, sep, value = item.rpartition("=")
        if not sep or not token:
            raise click.BadParameter(f"{item!r} is not TOKEN=BIAS", param_hint="--logit-bias")
        v = value.strip().lower()
        try:
            bias = -math.inf if v in ("ban", "-inf") else float(v)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number, -inf or ban", param_hint="--logit-bias") from None
        if _ID.fullmatch(token.strip()):
            i = int(token)
            if i < 0:
                raise click.BadParameter(
                    f"token id {i} is negative (ids start at 0; quote text that looks like a number: '\"{i}\"=...')",
                    param_hint="--logit-bias",
                )
            ids = [i]
        else:
            text = token[1:-1] if len(token) >= 2 and token[0] == token[-1] == '"' else token
            ids = tokenizer.encode(text, add_special_tokens=False, field="logit_bias")
            if not ids:
                raise click.BadParameter(f"{token!r} encodes to no tokens", param_hint="--logit-bias")
        for i in ids:
            if i in out and out[i] != bias:
                raise click.BadParameter(
                    f"{item!r} gives token {i} the bias {bias:g}, but {given[i]!r} gave it {out[i]:g}: one bias per"
                    " token",
                    param_hint="--logit-bias",
                )
            out[i], given[i] = bias, item
    return out


def request_params(model: er.Model, flags: dict[str, Any]) -> dict[str, Any]:
    """The command line's flags as request parameters (``edgeroute.params``'s names; None = not given)."""
    params: dict[str, Any] = {name: flags.get(name) for name, _, _ in SAMPLING_FLAGS}
    params["explore_schedule"] = flags.get("explore_schedule")
    if flags.get("logit_bias"):
        bias = parse_logit_bias(flags["logit_bias"], model.tokenizer)
        bad = [i for i in bias if i >= model.vocab_size]
        if bad:
            raise click.BadParameter(
                f"token id {bad[0]} is outside the vocabulary ({model.vocab_size})", param_hint="--logit-bias"
            )
        params["logit_bias"] = bias
    for name in ("max_new_tokens", "min_new_tokens", "logprobs"):
        params[name] = flags.get(name)
    if flags.get("stop"):
        params["stop"] = list(flags["stop"])
    if flags.get("adapter"):
        params["adapter"] = adapter_name(model, flags["adapter"])
    params.update(constraint_params(flags))
    return params


def named_paths(items: tuple[str, ...], flag: str) -> dict[str, str]:
    """``NAME=PATH`` flags (``--lora``) as a dict; a malformed or repeated name is a usage error naming ``flag``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} is not NAME=PATH", param_hint=flag)
        if name in out:
            raise click.BadParameter(f"the name {name!r} is given twice", param_hint=flag)
        out[name] = path
    return out


def adapter_name(model: er.Model, given: str) -> str:
    """``--adapter``'s adapter: one the model holds by that name, else the adapter at that path, loaded now."""
    if given in model.adapters:
        return given
    path = Path(given).expanduser()
    if not path.exists():
        held = ", ".join(model.adapters.names()) or "none"
        raise click.BadParameter(
            f"{given!r} is neither an adapter of the model (it has: {held}) nor an adapter folder or file",
            param_hint="--adapter",
        )
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name).lstrip("._-") or "adapter"
    model.load_adapter(name, path)
    return name


def build_request(
    model: er.Model, flags: dict[str, Any], provider: str = "cpu", threads: int | None = None
) -> tuple[er.GenerationConfig, er.Flows]:
    """The request's configs from command-line flags over the manifest's generation defaults (validated when the
    manifest was loaded: a bad default is the folder's error, not a flag's), through the runtime's one
    parameters-to-configs function. A second model (draft, contrast) gets the target's context and does not spin.
    """

    def load(path: str) -> er.Model:
        return load_model(path, provider, threads, spin=False, ctx_size=model.context_length)

    params = {**request_params(model, flags), **flow_params(flags)}
    defaults = dict(model.manifest.generation_defaults)
    beams = flags.get("num_beams") or 1
    if beams > 1:  # beam search scores log-probabilities: the checkpoint's sampling defaults do not apply to it
        for name in ("num_beams", "num_return_sequences", "length_penalty", "early_stopping"):
            params[name] = flags.get(name)
        defaults = {k: v for k, v in defaults.items() if k not in _SAMPLING_DEFAULTS}
    return er.from_params(params, defaults, load)


_SAMPLING_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def build_config(model: er.Model, flags: dict[str, Any]) -> er.GenerationConfig:
    """The GenerationConfig of a command without flows (chat, bench)."""
    return build_request(model, flags)[0]


def cuda_graph_flag() -> bool:
    """Whether the running command was given --cuda-graph (model_options)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_CUDA_GRAPH))


def load_model(
    path: str,
    provider: str,
    threads: int | None,
    spin: bool = True,
    ctx_size: int | None = None,
    options: dict[str, Any] | None = None,
) -> er.Model:
    cuda_graph = cuda_graph_flag()
    model = er.Model.load(
        path, provider=provider, threads=threads, spin=spin, context_size=ctx_size, cuda_graph=cuda_graph,
        **(options or {}),
    )  # fmt: skip
    ctx = click.get_current_context(silent=True)
    if ctx is not None and model.prefix_cache is not None:  # the command's blocks on disk before it returns
        ctx.call_on_close(model.prefix_cache.close)
    return model


def needs_second_model(flags: dict[str, Any]) -> bool:
    """A draft model or a contrast model runs in turn with the target: neither should spin (docs/router.md)."""
    return (flags.get("draft") not in (None, "ngram")) or flags.get("contrast") is not None
