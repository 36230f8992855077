"""Reasoning models (issue 35, point 4, in part): the thinking block of an answer as ``reasoning_content`` and
``reasoning``, whole and streamed, with ``content`` only the answer (``serve/reasoning.py``, ``serve/chat.py``)."""

from __future__ import annotations

from typing import Any

import edgeroute as er
import pytest
from edgeroute.serve import Settings, create_app
from edgeroute.serve.chat import ChatEncoder
from edgeroute.serve.encoder import Reply
from edgeroute.serve.protocol import TokenText, fingerprint
from edgeroute.serve.reasoning import ThinkSplit, split
from serve_helpers import Running, openai_client
from tiny_model import CHATML

USER = [{"role": "user", "content": "What is the capital of France?"}]
# a template that thinks (it writes </think> for past turns) and opens the block for the answer (R1 distills)
OPENING = CHATML.replace(  # (the tiny template's strings hold real newlines)
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}{# </think> #}",
)

CASES = [
    # (answer, starts inside the block, reasoning, content)
    ("Let me think.\nIt is Paris.</think>\n\nParis.", True, "Let me think.\nIt is Paris.", "Paris."),
    ("<think>\nshort</think>Paris.", False, "short", "Paris."),
    ("  <think>r</think>\n\n\nthe answer", False, "r", "the answer"),
    ("plain answer, a < b and c > d", False, None, "plain answer, a < b and c > d"),
    ("<thinking is a word", False, None, "<thinking is a word"),
    ("<think>never closed, the length ran out", False, "never closed, the length ran out", None),
    ("all thinking, cut", True, "all thinking, cut", None),
    ("done</think>", True, "done", ""),
]


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), CASES)
def test_a_whole_answer_splits_into_reasoning_and_content(
    text: str, inside: bool, reasoning: str | None, content: str | None
) -> None:
    assert split(text, inside) == (reasoning, content)


def joined(splitter: ThinkSplit, pieces: list[str]) -> tuple[str, str, bool, bool]:
    out = [p for piece in pieces for p in splitter.push(piece)] + splitter.flush()
    reasoning = "".join(p for kind, p in out if kind == "reasoning")
    return reasoning, "".join(p for kind, p in out if kind == "content"), splitter.seen_block, splitter.closed


@pytest.mark.parametrize(("text", "inside"), [(c[0], c[1]) for c in CASES])
def test_streamed_pieces_are_the_whole_split_wherever_the_text_is_cut(text: str, inside: bool) -> None:
    """Every way of cutting the answer in two or three pieces (tags split across pieces included) gives what the
    whole answer gives."""
    whole = joined(ThinkSplit(inside), [text])
    cuts = [(i,) for i in range(len(text) + 1)] + [(i, j) for i in range(0, len(text), 3) for j in range(i, len(text))]
    for cut in cuts:
        bounds = [0, *cut, len(text)]
        assert joined(ThinkSplit(inside), [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]) == whole, cut


def test_the_encoder_streams_thinking_as_reasoning_deltas(make_tiny: Any) -> None:
    model = er.Model.load(make_tiny(chat_template=OPENING))
    enc = ChatEncoder()
    parsed = enc.parse({"messages": USER, "stream": True}, model, "m")
    assert parsed.think is True  # the prompt ends inside the block
    reply = Reply(enc, parsed, TokenText(model.tokenizer), frozenset(model.manifest.eos_token_ids), fingerprint(model))
    texts = ["Hmm, ", "France", "'s capital.</th", "ink>\n", "\n", "Paris", "."]
    deltas = []
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        for event in reply.step(0, er.Step(5, t, None, "stop" if last else None)):
            deltas.append(event["choices"][0]["delta"])
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning", "") for d in deltas) == "Hmm, France's capital."
    assert "".join(d.get("content", "") for d in deltas) == "Paris."
    assert not any("</" in d.get("content", "") + d.get("reasoning", "") for d in deltas)
    assert deltas[-1] == {}  # the finish event


def test_a_served_reasoning_model_answers_with_reasoning_content(make_tiny: Any) -> None:
    """Through the official client: a model whose template opens the thinking block, cut by max_tokens inside it
    (the tiny model never closes it): the whole text is reasoning, content null; streamed, the deltas say the same."""
    model = er.Model.load(make_tiny(chat_template=OPENING))
    ids = model.tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    alone = model.generate(ids, er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0)))
    assert "</think>" not in alone.text
    with Running(create_app(model, Settings("m"))) as srv:
        client = openai_client(srv)
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=10, temperature=0)  # type: ignore[arg-type]
        message = r.choices[0].message.model_dump()
        assert message["content"] is None and message["reasoning_content"] == alone.text.strip()
        assert message["reasoning"] == message["reasoning_content"]
        chunks = list(
            client.chat.completions.create(model="m", messages=USER, max_tokens=10, temperature=0, stream=True)  # type: ignore[arg-type]
        )
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == alone.text.strip()
        assert not any(d.get("content") for d in deltas)


def test_a_model_without_a_thinking_block_answers_as_before(tiny: er.Model) -> None:
    parsed = ChatEncoder().parse({"messages": USER}, tiny, "m")
    assert parsed.think is None
