"""vLLM's tokenizer routes, at the server root where lm-evaluation-harness's ``local-completions`` looks for them
(it strips ``/v1/completions`` from its ``base_url``): ``GET /tokenizer_info``, ``POST /tokenize`` (a prompt, or
chat messages through the model's template) and ``POST /detokenize``. Plain JSON in, plain JSON out; a mistake is
an :class:`APIError` naming the field."""

from __future__ import annotations

from typing import Any

import edgeroute as er

from .chat import parse_messages, template_variables
from .protocol import check_fields, check_type, invalid, parse_model

MAX_DETOKENIZE = 131_072  # ids per /detokenize request
_PROMPT = {"model", "prompt", "add_special_tokens", "return_token_strs"}
_CHAT = {"model", "messages", "add_generation_prompt", "add_special_tokens", "return_token_strs"}
_CHAT |= {"chat_template_kwargs", "reasoning_effort"}


def tokenizer_info(model: er.Model) -> dict[str, Any]:
    """What lm-eval reads to tokenise on the client's side: the special tokens, the chat template and the length."""
    special = model.tokenizer.special_tokens
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": special.get("eos_token"),
        "bos_token": special.get("bos_token"),
        "pad_token": special.get("pad_token"),
        "unk_token": special.get("unk_token"),
        "chat_template": model.tokenizer.chat_template,
        "model_max_length": model.context_length,
        "vocab_size": model.vocab_size,
    }


def tokenize(body: Any, model: er.Model, served: str) -> dict[str, Any]:
    """``{"prompt": str}`` (``add_special_tokens`` true by default: BOS where the model expects one) or
    ``{"messages": [...]}`` (the chat template, ``add_generation_prompt`` true by default) -> vLLM's answer:
    ``count``, ``max_model_len``, ``tokens`` and, with ``return_token_strs``, ``token_strs``."""
    chat = isinstance(body, dict) and "messages" in body
    _fields(body, _CHAT if chat else _PROMPT, served, model)
    strs = check_type(body, "return_token_strs", bool, "a boolean") or False
    if chat:
        add = check_type(body, "add_generation_prompt", bool, "a boolean")
        variables = template_variables(body, model.tokenizer)
        try:
            ids = model.tokenizer.apply_chat_template(
                parse_messages(body["messages"]), add_generation_prompt=add is not False, **variables
            )
        except (er.ConfigError, er.ChatTemplateError) as e:
            raise invalid("messages", f"messages: {getattr(e, 'reason', e)}") from None
        if check_type(body, "add_special_tokens", bool, "a boolean"):  # the template wrote them: nothing to add
            raise invalid(
                "add_special_tokens", "add_special_tokens with messages is not supported", "unsupported_value"
            )
    else:
        prompt = check_type(body, "prompt", str, "a string")
        if prompt is None:
            raise invalid("prompt", "prompt (a string) or messages is required", "missing_required_parameter")
        add = check_type(body, "add_special_tokens", bool, "a boolean")
        try:
            ids = model.tokenizer.encode(prompt, add_special_tokens=add is not False)
        except er.ConfigError as e:
            raise invalid("prompt", f"prompt: {e.reason}") from None
    out: dict[str, Any] = {"count": len(ids), "max_model_len": model.context_length, "tokens": ids, "token_strs": None}
    if strs:
        out["token_strs"] = [model.tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    return out


def detokenize(body: Any, model: er.Model, served: str) -> dict[str, Any]:
    """``{"tokens": [ids]}`` -> ``{"prompt": text}`` (special tokens kept: what ``/tokenize`` gave comes back)."""
    _fields(body, {"model", "tokens"}, served, model)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise invalid("tokens", "tokens is required: an array of token ids", "invalid_type")
    if len(tokens) > MAX_DETOKENIZE:
        raise invalid("tokens", f"at most {MAX_DETOKENIZE} tokens per request (got {len(tokens)})")
    bad = next((t for t in tokens if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise invalid("tokens", f"token id {bad} is outside the vocabulary [0, {model.vocab_size})")
    return {"prompt": model.tokenizer.decode(tokens, skip_special_tokens=False)}


def _fields(body: Any, allowed: set[str], served: str, model: er.Model) -> None:
    """The fields are ``allowed``; ``model`` names the served model or one of its adapters (they share the
    tokenizer: the answer is the same)."""
    parse_model(check_fields(body, allowed), served, model)
