"""Reasoning models' answers: the text a model writes inside ``<think>…</think>`` (Qwen3, SmolLM3, DeepSeek-R1
distills) is its reasoning, returned as ``message.reasoning_content`` and ``message.reasoning`` (clients read one
name or the other), and ``content`` holds only what follows the block.

A model thinks when its chat template writes ``</think>``. Its answer may start inside the block without the
opening tag (a template that ends the prompt with ``<think>``): :func:`opens_thinking` reads that from the prompt.
An answer cut inside the block (its length ran out) is all reasoning and has no content (``null``).
"""

from __future__ import annotations

from collections.abc import Sequence

import edgeroute as er
from edgeroute.thinking import CLOSE, OPEN, THINKING, phase_of_prompt


def thinks(tokenizer: er.Tokenizer) -> bool:
    """Whether the model's chat template has a thinking block."""
    return CLOSE in (tokenizer.chat_template or "")


def opens_thinking(tokenizer: er.Tokenizer, prompt: Sequence[int]) -> bool:
    """Whether ``prompt`` ends inside an open thinking block (the answer starts as reasoning)."""
    return phase_of_prompt(tokenizer, prompt) == THINKING


def split(text: str, inside: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; ``inside``: the answer starts inside the block."""
    stream = ThinkSplit(inside)
    parts = stream.push(text) + stream.flush()
    reasoning = "".join(p for kind, p in parts if kind == "reasoning")
    content = "".join(p for kind, p in parts if kind == "content")
    if not stream.seen_block:
        return None, text
    return reasoning.strip(), (content if stream.closed else None)


class ThinkSplit:
    """Text pieces as they stream -> ``("reasoning" | "content", piece)`` pieces: the tags are dropped, the blank
    lines after ``</think>`` too, and a piece that may be the start of a tag is held until the next one decides."""

    def __init__(self, inside: bool) -> None:
        self.state = "reasoning" if inside else "start"
        self.seen_block = inside
        self.closed = False
        self.held = ""

    def push(self, text: str) -> list[tuple[str, str]]:
        self.held += text
        out: list[tuple[str, str]] = []
        while self.held:
            if self.state == "start":  # an answer that opens the block itself, maybe after whitespace
                body = self.held.lstrip()
                if OPEN.startswith(body):  # all whitespace, or a part of the tag: wait
                    break
                if body.startswith(OPEN):
                    self.held, self.state, self.seen_block = body[len(OPEN) :], "reasoning", True
                    continue
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = self.held.find(CLOSE)
                if at >= 0:
                    out.append(("reasoning", self.held[:at]))
                    self.held, self.state, self.closed = self.held[at + len(CLOSE) :], "after", True
                    continue
                keep = _partial(self.held, CLOSE)
                out.append(("reasoning", self.held[: len(self.held) - keep]))
                self.held = self.held[len(self.held) - keep :]
                break
            if self.state == "after":  # the blank lines between the block and the answer
                self.held = self.held.lstrip("\n")
                if not self.held:
                    break
                self.state = "content"
                continue
            out.append(("content", self.held))
            self.held = ""
        return [(k, p) for k, p in out if p]

    def flush(self) -> list[tuple[str, str]]:
        """What is still held when the answer ends."""
        held, self.held = self.held, ""
        if not held:
            return []
        if self.state == "reasoning":
            return [("reasoning", held)]
        return [] if self.state == "after" else [("content", held.lstrip() if self.state == "start" else held)]


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
