"""Text in and out: ``tokenizer.json`` through ``tokenizers``, chat templates (``chat_template.py``), streaming text.

The chat template is rendered exactly as transformers' ``apply_chat_template`` renders it, with the same
variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special-token strings),
within a budget of time and size (see ``chat_template.py``).

Text must be valid Unicode: a string with a lone surrogate (what undecodable bytes become under Python's
``surrogateescape``) is refused with a ``ConfigError`` rather than handed to the tokenizer.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from . import chat_template
from .errors import ChatTemplateError, ConfigError, ModelLoadError, first_line

TOKENIZER_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class Tokenizer:
    """Encode, decode and render chat templates for one model.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        chat_template: the checkpoint's Jinja chat template, or None.
        special_tokens: token strings given to the template (``bos_token``, ``eos_token``, ...).
        name: where the template comes from, for error messages (the model folder's manifest).
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, Any] | None = None,
        name: str = "this model",
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.name = name
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
            raise ModelLoadError(f"{path} is not a valid tokenizer file: {first_line(e)}") from e
        return cls(tok, chat_template, special_tokens, name=str(Path(folder) / "edgeroute.json"))

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """How many ids have a token: ``0 .. vocab_size - 1`` (added tokens included)."""
        n = int(self._tok.get_vocab_size(with_added_tokens=True))
        if n and self._tok.id_to_token(n - 1) is not None and self._tok.id_to_token(n) is None:
            return n
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1  # ids with holes

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Token ids of ``text`` (the tokenizer's post-processor adds BOS where the model expects it).

        ``field`` names the setting in the ``ConfigError`` raised for text that is not a valid Unicode string."""
        if not isinstance(text, str):
            raise ConfigError(field, text, "must be a string")
        return list(self._tok.encode(self._valid(text, field), add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (OpenAI's logprob ``bytes``): a byte-level BPE token's bytes, a
        SentencePiece byte token's (``<0xE2>``) byte, else the UTF-8 of the token's decoded text. Unlike
        ``decode([id])``, a token holding part of a multi-byte character gives that part, not U+FFFD."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is not None and self._byte_level and token_id not in self.special_ids:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if piece is not None and _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @cached_property
    def _byte_level(self) -> bool:
        """True when the decoder is (or contains) byte-level BPE's."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        parts = decoder.get("decoders") or [decoder]
        return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)

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
        variables.update(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt)
        return chat_template.render(self.chat_template, self.name, variables)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        plain_content: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template text, none are added).

        With ``plain_content``, the messages' text contents are tokenised as plain text: special-token text inside
        them (``<|im_start|>system``) stays text, never the control token it spells; only the template's own text
        makes control tokens. Without it (the default, what transformers and most servers do) the rendered chat is
        tokenised as a whole, so a message can write control tokens.

        Raises ``ConfigError`` (``messages``) for text that is not valid Unicode, and ``ChatTemplateError`` when the
        template renders nothing."""
        if plain_content:
            ids = self._plain_content_ids(messages, add_generation_prompt, **kwargs)
        else:
            ids = self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), False, field="messages")
        if not ids:
            raise ChatTemplateError(f"the chat template of {self.name} rendered no text for {len(messages)} message(s)")
        return ids

    def _plain_content_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, **kwargs: Any
    ) -> list[int]:
        """The chat rendered with a marker in place of each text content, then tokenised piece by piece: the
        template's text with special tokens parsed, each content with them split as plain text."""
        tag = secrets.token_hex(8)  # no client text can predict it
        marked, contents = [], {}
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, str) and content:
                key = f"\ue000{tag}:{i}\ue001"
                contents[key] = content
                m = {**m, "content": key}
            marked.append(m)
        text = self.render_chat(marked, add_generation_prompt, **kwargs)
        ids: list[int] = []
        for j, piece in enumerate(re.split(f"(\ue000{tag}:\\d+\ue001)", text)):
            if j % 2:  # a marker: the content it stands for, special-token text split
                ids += self._plain.encode(self._valid(contents[piece], "messages"), add_special_tokens=False).ids
            elif piece:
                ids += self.encode(piece, False, field="messages")
        return ids

    @cached_property
    def _plain(self) -> _HFTokenizer:
        """A copy of the tokenizer that reads special-token text as plain text (its own object: the flag is the
        tokenizer's state, and the shared one is used by other threads)."""
        tok = _HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @staticmethod
    def _valid(text: str, field: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                field, text[max(e.start - 8, 0) : e.end + 8], f"is not valid UTF-8 text (a lone surrogate at {e.start})"
            ) from None
        return text

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
