"""What an endpoint is: an :class:`Encoder` (a request body -> the engine's submissions; the engine's results ->
the endpoint's whole answer and stream events) and :class:`Reply`, one request's answer in the making, which holds
what every endpoint's objects share (the id, ``created``, the model, ``system_fingerprint``, ``usage``) and asks the
encoder for each choice's part.

Everything here is plain data in, plain JSON objects out: no web framework, no event loop, no engine. The transport
(``serve.transport``) submits, waits, cancels, counts and frames; a test drives a :class:`Reply` with
:class:`edgeroute.Step` s and :class:`edgeroute.Completion` s built by hand.

Adding an endpoint is adding one subclass of :class:`Encoder` (its path, object names, request parser and choice
renderers) and listing it in ``serve.app.create_app``.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import edgeroute as er

from .protocol import Parsed, TokenText, now, usage

P = TypeVar("P", bound=Parsed)
Entry = tuple[int, float, Sequence[tuple[int, float]] | None]  # a token's id, logprob and top alternatives


class ChoiceStream(ABC):
    """One streamed choice: each step of the engine -> the choice entries of the events it sends (each entry is
    one event's ``choices[0]``), in order."""

    @abstractmethod
    def step(self, step: er.Step, logprobs: bool) -> list[dict[str, Any]]:
        """The entries for ``step``; ``logprobs``: the step's logprob belongs in the answer."""


class Encoder(ABC, Generic[P]):
    """One endpoint of the API. Subclasses set the class attributes and implement :meth:`parse`, :meth:`choice`
    and :meth:`stream` (and :meth:`opening` when a streamed choice starts with an entry of its own)."""

    path: ClassVar[str]  # the route, e.g. "/v1/completions"
    object: ClassVar[str]  # a whole answer's "object"
    chunk_object: ClassVar[str]  # a stream event's "object"
    id_prefix: ClassVar[str]  # an answer's id is this and 24 hex digits
    prompt_param: ClassVar[str]  # the parameter a 400 names for a prompt the context cannot hold

    @abstractmethod
    def parse(self, body: Any, model: er.Model, served: str) -> P:
        """The request body (parsed JSON, not checked yet) -> the request, or an ``APIError`` naming the parameter.
        ``served``: the model's public name. Runs in a worker thread."""

    @abstractmethod
    def choice(self, reply: Reply[P], index: int, completion: er.Completion) -> dict[str, Any]:
        """Choice ``index`` of a whole answer (an entry of its ``choices``)."""

    def opening(self, reply: Reply[P], index: int) -> dict[str, Any] | None:
        """The entry a streamed choice starts with, before any step (None: none)."""
        return None

    @abstractmethod
    def stream(self, reply: Reply[P], index: int) -> ChoiceStream:
        """Streamed choice ``index``'s renderer."""

    def reply(self, parsed: P, texts: TokenText, eos: frozenset[int], fingerprint: str) -> Reply[P]:
        return Reply(self, parsed, texts, eos, fingerprint)


class Reply(Generic[P]):
    """One request's answer: its head, its whole answer (:meth:`whole`) or its stream events (:meth:`opening`,
    :meth:`step`, :meth:`usage_event`), as JSON objects. ``texts``: the tokens' strings and bytes of the logprobs;
    ``eos``: the model's end-of-sequence ids (a stop token is not part of the answer, nor of its logprobs)."""

    def __init__(
        self,
        encoder: Encoder[P],
        parsed: P,
        texts: TokenText,
        eos: frozenset[int],
        fingerprint: str,
        id: str | None = None,  # noqa: A002 - OpenAI's name
        created: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.p = parsed
        self.texts = texts
        self.eos = eos
        self.configs = [cfg for _, cfg in parsed.choices()]
        self.id = id if id is not None else encoder.id_prefix + uuid.uuid4().hex[:24]
        self.created = created if created is not None else now()
        self.fingerprint = fingerprint
        self.prompt_tokens = sum(len(ids) for ids in parsed.prompts)
        self._streams: dict[int, ChoiceStream] = {}

    def head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.encoder.object,
            "created": self.created,
            "model": self.p.model,
            "system_fingerprint": self.fingerprint,
        }

    def prompt_index(self, index: int) -> int:
        """The prompt choice ``index`` answers (choices go prompt by prompt, ``n`` each)."""
        return index // self.p.n

    def stop_token(self, index: int, step: er.Step) -> bool:
        """Whether ``step`` is the token that ended choice ``index`` on a stop id (not part of the answer)."""
        config = self.configs[index]
        return step.finish_reason == "stop" and (step.token_id in self.eos or step.token_id in config.stop_token_ids)

    # -- whole answers ------------------------------------------------------------------------------------------
    def whole(self, completions: Sequence[er.Completion]) -> dict[str, Any]:
        choices = [self.encoder.choice(self, i, c) for i, c in enumerate(completions)]
        return {**self.head(), "choices": choices, "usage": self.usage(completions)}

    # -- streams ------------------------------------------------------------------------------------------------
    def event(self, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> dict[str, Any]:
        obj = {**self.head(), "object": self.encoder.chunk_object, "choices": choices}
        if self.p.include_usage:
            obj["usage"] = use  # null on every chunk but the last, as OpenAI sends it
        return obj

    def opening(self) -> list[dict[str, Any]]:
        """The events before any step: each choice's opening entry, in order (chat's role deltas)."""
        out = []
        for i in range(len(self.configs)):
            entry = self.encoder.opening(self, i)
            if entry is not None:
                out.append(self.event([entry]))
        return out

    def step(self, index: int, step: er.Step) -> list[dict[str, Any]]:
        """The events of choice ``index``'s next step."""
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self.encoder.stream(self, index)
        want = self.configs[index].want_logprobs and step.logprob is not None
        return [self.event([entry]) for entry in stream.step(step, want)]

    def closing(self, completions: Sequence[er.Completion]) -> list[dict[str, Any]]:
        """The events after every choice's last step, before ``[DONE]``: the usage event when asked for."""
        last = self.usage_event(completions)
        return [] if last is None else [last]

    def usage_event(self, completions: Sequence[er.Completion]) -> dict[str, Any] | None:
        """The last event before ``[DONE]`` (``choices: []`` and the usage) when the client asked for it."""
        if not self.p.include_usage:
            return None
        return self.event([], self.usage(completions))

    def usage(self, completions: Sequence[er.Completion]) -> dict[str, Any]:
        """The answer's usage: each prompt counted once for its ``n`` choices, its cached positions as its first
        choice found them."""
        cached = sum(c.usage.cached_tokens for c in completions[:: max(self.p.n, 1)])
        return usage(self.prompt_tokens, completion_tokens(completions), cached)


def completion_tokens(completions: Sequence[er.Completion]) -> int:
    return sum(c.usage.completion_tokens for c in completions)


def logprob_entries(completion: er.Completion) -> list[Entry]:
    """A whole answer's tokens with their logprobs, one per token counted in ``usage.completion_tokens``: the stop
    token that ended it included (its entry's text is empty: it is not part of the answer)."""
    return [(lp.token_id, lp.logprob, lp.top) for lp in (completion.logprobs or [])]


def is_stop_entry(completion: er.Completion, position: int) -> bool:
    """Whether entry ``position`` of :func:`logprob_entries` is the stop token that ended the answer."""
    return position >= len(completion.token_ids)
