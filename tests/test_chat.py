"""ChatSession: the KV cache is kept between turns, so each turn prefills only its own new tokens."""

from __future__ import annotations

import edgeroute as er
import numpy as np
import pytest

CFG = er.GenerationConfig(max_new_tokens=8, sampling=er.SamplingConfig(temperature=0))


def test_each_turn_prefills_only_its_new_tokens(tiny: er.Model) -> None:
    im_end = tiny.tokenizer.token_to_id("<|im_end|>")
    short = CFG.replace(sampling=er.SamplingConfig(temperature=0, logit_bias={im_end: 100.0}))
    chat = er.ChatSession(tiny, short, system="You are terse.")
    assert "".join(s.text for s in chat.send("Hello")) == ""
    gen = chat.generator
    before, fed_before = gen.tokens, gen.usage.prompt_tokens
    assert before[-1] == im_end  # the end-of-turn token the model produced is part of the sequence
    full = tiny.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "More?"},
        ]
    )
    list(chat.send("More?"))
    assert full[: len(before)] == before
    assert gen.usage.prompt_tokens - fed_before == len(full) - len(before)  # only the new turn was fed
    assert gen.cache.length >= len(full)


def test_answers_equal_a_full_recomputation(tiny: er.Model) -> None:
    chat = er.ChatSession(tiny, CFG, system="You are terse.")
    a1 = "".join(s.text for s in chat.send("Hello"))
    a2 = "".join(s.text for s in chat.send("More?"))
    fresh = tiny.generator(CFG)
    fresh.append(
        tiny.tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": "More?"},
            ]
        )
    )
    assert a2 == "".join(s.text for s in fresh)
    assert chat.messages[-1] == {"role": "assistant", "content": a2}


def test_interrupted_answer_is_kept_and_the_next_turn_recovers(tiny: er.Model) -> None:
    chat = er.ChatSession(tiny, CFG)
    stream = chat.send("Hello")
    next(stream)
    stream.close()  # the caller stops reading (Ctrl-C in the CLI)
    partial = chat.messages[-1]["content"]
    assert chat.messages[-1]["role"] == "assistant"
    answer = "".join(s.text for s in chat.send("Go on"))
    fresh = tiny.generator(CFG)
    fresh.append(
        tiny.tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": partial},
                {"role": "user", "content": "Go on"},
            ]
        )
    )
    assert answer == "".join(s.text for s in fresh)


def test_reset_overflow_and_no_template(tiny: er.Model, make_tiny) -> None:
    chat = er.ChatSession(tiny, CFG.replace(max_new_tokens=500))
    with pytest.raises(er.ContextOverflowError):
        list(chat.send("x" * 100))
    assert chat.messages == []  # the refused turn is not kept
    chat = er.ChatSession(tiny, CFG)
    list(chat.send("Hello"))
    chat.reset()
    assert chat.messages == [] and chat.generator.tokens == []
    plain = er.Model.load(make_tiny(chat_template=None))
    with pytest.raises(er.ConfigError):
        er.ChatSession(plain, CFG)


def test_common_prefix() -> None:
    from edgeroute.kv_cache import common_prefix

    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(np.array([7, 8, 9]), [7, 8, 9]) == 3
    assert common_prefix([5], [6]) == 0
