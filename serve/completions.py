"""``POST /v1/completions``: a completion request (OpenAI's four prompt shapes, ``echo``, ``logprobs: int``) -> the
prompts and configs; the engine's results -> ``text_completion`` objects and events (the echoed prompt, text pieces
with their logprobs and offsets, each choice's ``finish_reason``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import edgeroute as er
from edgeroute.scoring import prompt_scores

from .encoder import ChoiceStream, Encoder, Reply, logprob_entries
from .protocol import (
    COMPLETION_FIELDS,
    MAX_N,
    MAX_TOKEN_NAMES,
    Parsed,
    adapter_of,
    check_type,
    choice_configs,
    finish,
    from_config_error,
    generation_params,
    invalid,
    parse_common,
)


@dataclass
class CompletionRequest(Parsed):
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)  # [prompt]: the text of each (echoed)
    # [prompt]: each prompt token after the first scored from the raw logits (echo with logprobs), else empty
    prompt_scores: list[list[er.TokenScore]] = field(default_factory=list)


class CompletionsEncoder(Encoder[CompletionRequest]):
    """Text completions."""

    path = "/v1/completions"
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"
    prompt_param = "prompt"

    def parse(self, body: Any, model: er.Model, served: str) -> CompletionRequest:
        return parse_completion(body, model, served)

    def choice(self, reply: Reply[CompletionRequest], index: int, completion: er.Completion) -> dict[str, Any]:
        c = completion
        prefix = _echoed(reply, index)
        lp_obj = None
        if c.logprobs is not None:
            want_top = reply.configs[index].top_logprobs > 0
            lp_obj = reply.texts.completion_logprobs(logprob_entries(c), len(prefix), want_top, len(c.token_ids))
            echoed = _echoed_logprobs(reply, index, c.prompt_logprobs)
            if echoed is not None:
                lp_obj = {k: None if echoed[k] is None else echoed[k] + lp_obj[k] for k in lp_obj}
        return {"index": index, "text": prefix + c.text, "logprobs": lp_obj, "finish_reason": finish(c.finish_reason)}

    def opening(self, reply: Reply[CompletionRequest], index: int) -> dict[str, Any] | None:
        if not reply.p.echo:
            return None
        lp = _echoed_logprobs(reply, index)
        return {"index": index, "text": _echoed(reply, index), "logprobs": lp, "finish_reason": None}

    def stream(self, reply: Reply[CompletionRequest], index: int) -> ChoiceStream:
        return _TextStream(reply, index)


def _echoed(reply: Reply[CompletionRequest], index: int) -> str:
    """The prompt's text that choice ``index`` starts with (``echo``), else ``""``."""
    return reply.p.prompt_texts[reply.prompt_index(index)] if reply.p.echo else ""


def _echoed_logprobs(
    reply: Reply[CompletionRequest], index: int, scored: list[er.TokenScore] | None = None
) -> dict[str, Any] | None:
    """The echoed prompt's part of choice ``index``'s logprobs (``echo`` with ``logprobs``), else None: one entry
    per prompt token, ``null`` first (the first token has no context), each from the raw logits: the scores of
    the request's parse (a stream) or the engine's (``scored``, the completion's ``prompt_logprobs``)."""
    if not reply.p.echo:
        return None
    p = reply.prompt_index(index)
    scores = reply.p.prompt_scores[p] if reply.p.prompt_scores else scored
    if scores is None:
        return None
    want_top = reply.configs[index].top_logprobs > 0
    return reply.texts.prompt_logprobs(reply.p.prompts[p], scores, want_top)


class _TextStream(ChoiceStream):
    """A streamed completion: text pieces (their logprobs' ``text_offset`` counted from the echoed prompt's
    start), then the finish reason."""

    def __init__(self, reply: Reply[CompletionRequest], index: int) -> None:
        self.reply = reply
        self.index = index
        self.offset = len(_echoed(reply, index))

    def step(self, step: er.Step, logprobs: bool) -> list[dict[str, Any]]:
        out = []
        if step.text or logprobs:
            lp = None
            if logprobs:
                assert step.logprob is not None
                want_top = self.reply.configs[self.index].top_logprobs > 0
                entries = [(step.token_id, step.logprob, step.top_logprobs)]
                stop = self.reply.stop_token(self.index, step)
                lp = self.reply.texts.completion_logprobs(entries, self.offset, want_top, 0 if stop else None)
            self.offset += len(step.text)
            out.append({"index": self.index, "text": step.text, "logprobs": lp, "finish_reason": None})
        if step.finish_reason is not None:
            reason = finish(step.finish_reason)
            out.append({"index": self.index, "text": "", "logprobs": None, "finish_reason": reason})
        return out


# -- the request ------------------------------------------------------------------------------------------------
def parse_completion(body: Any, model: er.Model, served: str) -> CompletionRequest:
    name, n, stream, include_usage = parse_common(body, COMPLETION_FIELDS, served, model)
    adapter = adapter_of(name, served)
    echo = check_type(body, "echo", bool, "a boolean") or False
    best_of = check_type(body, "best_of", int, "an integer")
    if best_of is not None and best_of != n:
        raise invalid(
            "best_of", f"best_of must equal n ({n}): choosing the best of several is not supported", "unsupported_value"
        )
    if body.get("suffix") is not None:
        raise invalid("suffix", "suffix (insertion) is not supported", "unsupported_value")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise invalid("logprobs", "logprobs must be an integer in [0, 20] for completions", "invalid_type")
    if body.get("top_logprobs") is not None:
        raise invalid(
            "top_logprobs", "top_logprobs is a chat parameter: completions take logprobs: int", "unknown_parameter"
        )
    prompts, texts = _prompts(body.get("prompt"), model)
    params = generation_params(body)
    if adapter is not None:
        params["adapter"] = adapter
    if echo and any(params.get(k) == 0 for k in MAX_TOKEN_NAMES):
        # the prompt's logprobs alone, as older eval clients ask for them: one token is generated (vLLM's rule)
        params = {k: 1 if k in MAX_TOKEN_NAMES and v == 0 else v for k, v in params.items()}
    scores = []
    if echo and logprobs is not None:  # lm-eval's log-likelihood contract: every prompt token's logprob
        if stream:  # the echoed prompt's logprobs open the stream, before the engine runs: scored here
            try:
                scores = [prompt_scores(model, ids, logprobs, adapter) for ids in prompts]
            except er.ConfigError as e:  # the adapter was unloaded since parse_common
                raise from_config_error(e, "prompt") from None
        else:  # scored by the engine from the prefill that generation runs anyway (one pass over the prompt)
            params["prompt_logprobs"] = logprobs
    configs, flows = choice_configs(model, params, prompts, n, "prompt")
    return CompletionRequest(name, prompts, configs, flows, n, stream, include_usage, echo, texts, scores)


def _prompts(prompt: Any, model: er.Model) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if prompt is None:
        raise invalid("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _ids(prompt)):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid(
            "prompt", "prompt must be a string, an array of strings, token ids or arrays of token ids", "invalid_type"
        )
    if len(items) > MAX_N:
        raise invalid("prompt", f"at most {MAX_N} prompts per request (got {len(items)})")
    ids_out, texts = [], []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if not (isinstance(item, str) or (isinstance(item, list) and _ids(item))):
            raise invalid(where, f"{where} must be a string or an array of token ids", "invalid_type")
        try:
            ids = model.encode_prompt(item)
        except er.ConfigError as e:
            raise invalid(where, f"{where}: {e.reason}") from None
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise invalid(where, f"{where}: token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        ids_out.append(ids)
        texts.append(item if isinstance(item, str) else model.tokenizer.decode(ids))
    return ids_out, texts


def _ids(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(t, int) and not isinstance(t, bool) for t in items)
