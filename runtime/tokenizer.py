"""Text in and out: ``tokenizer.json`` through ``tokenizers``, chat templates through jinja2, streaming text.

The chat template is rendered exactly as transformers' ``apply_chat_template`` renders it: the same sandboxed
environment (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the ``{% generation %}`` tag), the same
``tojson`` filter, ``raise_exception`` and ``strftime_now`` globals, and the same variables (``messages``,
``tools``, ``documents``, ``add_generation_prompt`` and the special-token strings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import ConfigError, ModelLoadError

TOKENIZER_FILE = "tokenizer.json"


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant masks in transformers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


class Tokenizer:
    """Encode, decode and render chat templates for one model.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        chat_template: the checkpoint's Jinja chat template, or None.
        special_tokens: token strings given to the template (``bos_token``, ``eos_token``, ...).
    """

    def __init__(
        self, tokenizer: _HFTokenizer, chat_template: str | None = None, special_tokens: Mapping[str, Any] | None = None
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_folder(
        cls, folder: str | Path, chat_template: str | None = None, special_tokens: Mapping[str, Any] | None = None
    ) -> Tokenizer:
        """Load ``folder/tokenizer.json``."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"{path} is not a valid tokenizer file: {str(e).splitlines()[0]}") from e
        return cls(tok, chat_template, special_tokens)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the tokenizer's post-processor adds BOS where the model expects it)."""
        if not isinstance(text, str):
            raise ConfigError("prompt", text, "must be a string")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat template rendered to text, as transformers renders it."""
        if self.chat_template is None:
            raise ConfigError("messages", "chat", "this model has no chat template")
        if not isinstance(messages, Sequence) or not all(isinstance(m, Mapping) for m in messages):
            raise ConfigError("messages", messages, "must be a list of {'role': ..., 'content': ...} mappings")
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return str(
                _compile(self.chat_template).render(
                    messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
                )
            )
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError("messages", "chat", f"the chat template refused them: {e}") from e

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template text, none are added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def stream(self) -> TextStream:
        """A fresh streaming detokenizer."""
        return TextStream(self._tok)


class TextStream:
    """Incremental detokenization: ``push(id)`` returns the new text, only whole UTF-8 characters.

    Built on ``tokenizers.decoders.DecodeStream``, so an emoji or CJK character split across tokens comes out
    once complete, never as U+FFFD, and the concatenated output equals one-shot ``decode`` of the same ids.
    """

    def __init__(self, tok: _HFTokenizer) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        piece = self._stream.step(self._tok, int(token_id))
        return piece or ""
