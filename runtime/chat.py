"""``ChatSession``: a multi-turn conversation over one Generator that keeps the KV cache between turns.

Each turn renders the whole conversation through the chat template, keeps the longest prefix of tokens the
Generator already holds (its KV cache included), rewinds the rest and appends only the new tokens: a turn
prefills its own tokens, not the history. If the template re-tokenises an earlier answer differently from how
it was generated, the divergent tail is simply recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator

from .config import GenerationConfig
from .errors import ConfigError, ContextOverflowError
from .generator import Generator, Step
from .kv_cache import common_prefix
from .model import Model


class ChatSession:
    """A conversation with ``model``. ``send(text)`` yields the answer's :class:`Step` objects."""

    def __init__(self, model: Model, config: GenerationConfig | None = None, system: str | None = None) -> None:
        if model.tokenizer.chat_template is None:
            raise ConfigError("chat", model.manifest.graph, "this model has no chat template")
        self.model = model
        self.config = config or GenerationConfig()
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.generator: Generator = model.generator(self.config)

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and the KV cache); optionally set a new system message."""
        self.system = system if system is not None else self.system
        self.messages = []
        self.generator = self.model.generator(self.config)

    def set_system(self, system: str | None) -> None:
        """Change the system message; the next turn recomputes from where the text changed."""
        self.system = system or None

    def _all_messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str) -> Iterator[Step]:
        """Add a user message and stream the answer. Interrupting the iteration keeps the partial answer."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.model.tokenizer.apply_chat_template(self._all_messages(), add_generation_prompt=True)
            gen = self.generator
            have = gen.tokens
            common = min(common_prefix(have, ids), len(ids) - 1)  # feed at least one token to get fresh logits
            if len(ids) + self.config.max_new_tokens > self.model.context_length:  # checked before rewinding
                raise ContextOverflowError(
                    len(ids) + self.config.max_new_tokens,
                    self.model.context_length,
                    "the conversation is too long: /reset it",
                )
            gen.rewind(len(have) - common)
            gen.append(ids[common:])
        except BaseException:
            self.messages.pop()
            raise
        answer: list[str] = []
        try:
            for step in gen:
                answer.append(step.text)
                yield step
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
