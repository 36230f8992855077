"""Reasoning models (issue 35, point 4): the thinking block of an answer as ``reasoning_content`` and
``reasoning``, whole and streamed, with ``content`` only the answer (``serve/reasoning.py``, ``serve/chat.py``),
and a constraint that applies only after the block (``edgeroute.thinking``)."""

from __future__ import annotations

from typing import Any

import edgeroute as er
import numpy as np
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


# -- think freely, answer strictly (edgeroute.thinking) -------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}
# a template that thinks but leaves the block to the model (Qwen3's shape), and one whose switch closed it
LEAVING = CHATML + "{# </think> #}"
CLOSED = OPENING.replace("<think>\n' }}", "<think>\n\n</think>\n\n' }}")


def choosers(model: er.Model, **sampling: Any) -> tuple[Any, Any, Any]:
    """(gated, the constraint alone, no constraint) choosers of one model, each fresh."""
    from edgeroute.choice import TokenChooser

    s = er.SamplingConfig(temperature=1.0, **sampling)
    schema = er.JsonSchema(SCHEMA)
    made = [
        er.GenerationConfig(constraint=schema, think_first=True, sampling=s),
        er.GenerationConfig(constraint=schema, sampling=s),
        er.GenerationConfig(sampling=s),
    ]
    return tuple(TokenChooser(model, c, np.random.default_rng(0)) for c in made)  # type: ignore[return-value]


def support(p: np.ndarray) -> set[int]:
    return set(np.flatnonzero(p > 0).tolist())


@pytest.mark.parametrize("committed", [False, True])
def test_thinking_is_free_and_the_answer_is_constrained_as_alone(make_tiny: Any, committed: bool) -> None:
    """Inside the block the routed distribution is the unconstrained one without the end tokens; after the token
    that closes it, it is the constraint's own on the answer's tokens alone. ``committed``: the tokens are accepted
    one by one (decoding), else read from the history as proposals (speculative decoding's way)."""
    model = er.Model.load(make_tiny(chat_template=OPENING, thinking_tokens=True))
    tok = model.tokenizer
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True)
    thinking = tok.encode("a is 4, so", add_special_tokens=False)
    answer = tok.encode('{"a": tr', add_special_tokens=False)
    close = tok.token_to_id("</think>")
    ends = sorted(model.manifest.eos_token_ids)
    gated, alone, free = choosers(model)
    rng = np.random.default_rng(1)
    turn = [*thinking, close, *answer]
    for i in range(len(turn) + 1):
        logits = rng.normal(0, 3, model.vocab_size).astype(np.float32)
        history = np.array(prompt + turn[:i])
        p = gated.dense(logits, history, i)
        if i <= len(thinking):  # thinking (the closing token is chosen freely too)
            q = free.dense(logits, history, i)
            q[ends] = 0
            np.testing.assert_allclose(p, q / q.sum(), rtol=1e-6, atol=1e-12)
        else:
            k = i - len(thinking) - 1
            np.testing.assert_allclose(p, alone.dense(logits, np.array(prompt + answer[:k]), k), rtol=1e-6)
            if k == 0:
                assert support(p) and all(tok.decode([t]).lstrip().startswith("{") for t in support(p))
        if committed and i < len(turn):
            gated.accept(turn[i])
            if i > len(thinking):
                alone.accept(turn[i])


def test_the_model_may_open_the_block_itself_and_a_closed_block_leaves_the_answer(make_tiny: Any) -> None:
    """A prompt that leaves the block to the model: the first token may be ``<think>`` or the constrained answer's;
    after ``<think>`` the thinking is free. A prompt whose template closed the block: the answer from the start."""
    model = er.Model.load(make_tiny(chat_template=LEAVING, thinking_tokens=True))
    tok = model.tokenizer
    opener = tok.token_to_id("<think>")
    logits = np.random.default_rng(2).normal(0, 3, model.vocab_size).astype(np.float32)
    prompt = tok.apply_chat_template(USER, add_generation_prompt=True)
    gated, alone, free = choosers(model)
    first = support(gated.dense(logits, np.array(prompt), 0))
    assert first == support(alone.dense(logits, np.array(prompt), 0)) | {opener}
    gated.accept(opener)
    inside = support(gated.dense(logits, np.array([*prompt, opener]), 1))
    assert inside == support(free.dense(logits, np.array([*prompt, opener]), 1)) - set(model.manifest.eos_token_ids)

    closed = er.Model.load(make_tiny(chat_template=CLOSED, thinking_tokens=True))
    prompt = closed.tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    gated, alone, _ = choosers(closed)
    np.testing.assert_allclose(gated.dense(logits, np.array(prompt), 0), alone.dense(logits, np.array(prompt), 0))


def think_then_answer(make_tiny: Any) -> er.Model:
    return er.Model.load(make_tiny(chat_template=OPENING, thinking_tokens=True))


# seeded so that the tiny model thinks a few tokens, then closes the block (pushed by a bias on </think>): the
# seeds of a schema answer and of a tool call (their prompts differ)
THINK_BIAS, THINK_SEED, TOOL_SEED = 4.0, 1, 3


def test_a_served_reasoning_model_thinks_then_answers_the_schema(make_tiny: Any) -> None:
    """Through the official client: a JSON schema and a function tool on a model that thinks first; the thinking
    is reasoning, the content (or the call) follows the constraint, whole and streamed."""
    import json

    model = think_then_answer(make_tiny)
    close = model.tokenizer.token_to_id("</think>")
    common: dict[str, Any] = dict(
        model="m", messages=USER, max_tokens=60, seed=THINK_SEED, logit_bias={str(close): THINK_BIAS}
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    tool = {"type": "function", "function": {"name": "add", "parameters": SCHEMA}}
    with Running(create_app(model, Settings("m"))) as srv:
        client = openai_client(srv)
        r = client.chat.completions.create(response_format=fmt, **common)
        message = r.choices[0].message.model_dump()
        assert message["reasoning_content"], message  # it thought first
        assert set(json.loads(message["content"])) == {"a"}
        chunks = list(client.chat.completions.create(response_format=fmt, stream=True, **common))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == message["reasoning_content"]
        assert "".join(d.get("content") or "" for d in deltas) == message["content"]

        common["seed"] = TOOL_SEED
        r = client.chat.completions.create(tools=[tool], tool_choice="required", **common)
        message = r.choices[0].message.model_dump()
        assert message["reasoning_content"] and r.choices[0].finish_reason == "tool_calls", message
        call = message["tool_calls"][0]["function"]
        assert call["name"] == "add" and set(json.loads(call["arguments"])) == {"a"}
        chunks = list(client.chat.completions.create(tools=[tool], tool_choice="required", stream=True, **common))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == message["reasoning_content"]
        streamed = "".join(tc["function"]["arguments"] or "" for d in deltas for tc in d.get("tool_calls") or [])
        assert json.loads(streamed) == json.loads(call["arguments"])


@pytest.mark.parametrize("seed", [None, 1])
def test_speculation_and_the_engine_keep_the_gated_tokens(make_tiny: Any, seed: int | None) -> None:
    """An answer that thinks, then answers the schema, is the same tokens in the engine beside another request as
    alone (greedy and seeded) and, greedy, with n-gram speculation (proposals judged by the gate; seeded
    speculation is exact in distribution, not in tokens)."""
    model = think_then_answer(make_tiny)
    close = model.tokenizer.token_to_id("</think>")
    prompt = model.tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    sampling = er.SamplingConfig(temperature=0 if seed is None else 1.0, seed=seed, logit_bias={close: THINK_BIAS})
    config = er.GenerationConfig(
        max_new_tokens=60, constraint=er.JsonSchema(SCHEMA), think_first=True, sampling=sampling
    )
    alone = model.generate(prompt, config)
    assert "</think>" in alone.text
    if seed is None:
        assert model.generate(prompt, config, draft="ngram").token_ids == alone.token_ids
    with er.Engine(model, max_batch=2) as engine:
        other = er.GenerationConfig(max_new_tokens=20, sampling=er.SamplingConfig(temperature=1.0, seed=5))
        reqs = [engine.submit(prompt, config), engine.submit(prompt, other)]
        assert reqs[0].result().token_ids == alone.token_ids
