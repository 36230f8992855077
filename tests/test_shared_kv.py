"""The default decode path without torch: the tiny decoder in the fused export's form (GroupQueryAttention over one
shared, in-place KV buffer per layer; ``tiny_model.build_shared_graph``) through the runtime's SharedKVCache."""

from __future__ import annotations

from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from conftest import generate_in_threads
from edgeroute.kv_cache import SharedKVCache

PROMPT = "Once upon a time a little robot"
GREEDY = er.GenerationConfig(max_new_tokens=20, sampling=er.SamplingConfig(temperature=0))


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("shared") / "model", kv_layout="shared")


@pytest.fixture(scope="module")
def shared(shared_dir: Path) -> er.Model:
    model = er.Model.load(shared_dir)
    assert model.shared_kv and isinstance(model.new_cache(), SharedKVCache)
    return model


def full_logits(model: er.Model, ids: list[int]) -> np.ndarray:
    return model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_chunked_prefill_and_decode_equal_one_full_run(shared: er.Model, chunk: int) -> None:
    ids = shared.tokenizer.encode(PROMPT)
    want = full_logits(shared, ids)
    cache = shared.new_cache()
    rows = [shared.forward_last(np.array([ids[s : s + chunk]]), cache, len(ids[s : s + chunk]))[0] for s in
            range(0, len(ids), chunk)]  # fmt: skip
    assert cache.length == len(ids)
    assert np.abs(np.concatenate(rows) - want).max() < 1e-4


def test_greedy_decode_equals_recomputation_from_scratch(shared: er.Model) -> None:
    ids = shared.tokenizer.encode(PROMPT)
    out = shared.generate(ids, GREEDY)
    assert len(out.token_ids) > 5
    seq = list(ids)
    for tok in out.token_ids:
        assert tok == int(np.argmax(full_logits(shared, seq)[-1]))
        seq.append(tok)


def test_step_logits_is_the_bound_buffer_and_forward_a_copy(shared: er.Model) -> None:
    ids = shared.tokenizer.encode(PROMPT)
    cache = shared.new_cache()
    copied = shared.forward(np.array([ids]), cache)
    view = shared.step_logits(np.array([[5]]), cache)
    assert view.base is not None and not np.shares_memory(copied, view)
    before = view.copy()
    shared.step_logits(np.array([[6]]), cache)
    assert not np.array_equal(before, view)  # overwritten by the next run, as documented


def test_batch_rows_of_different_lengths_equal_each_alone(shared: er.Model) -> None:
    prompts = ["Hello", PROMPT, "The capital of France is Paris. The capital of Italy is"]
    batch = shared.generate(prompts, GREEDY)  # each row prefilled into its own slice of the buffer
    assert [c.token_ids for c in batch] == [shared.generate(p, GREEDY).token_ids for p in prompts]
    sampled = shared.generate(prompts, GREEDY.replace(sampling=er.SamplingConfig(temperature=0.9, seed=4)))
    assert all(0 < len(c.token_ids) <= GREEDY.max_new_tokens for c in sampled)


def test_rewind_then_generate_equals_a_fresh_run(shared: er.Model) -> None:
    ids = shared.tokenizer.encode(PROMPT)
    gen = shared.generator(GREEDY)
    gen.append(ids)
    first = [s.token_id for s in gen]
    gen.rewind(len(first) - 3)
    again = gen.run()  # the turn as a whole: the three kept tokens and the same continuation after them
    assert again.token_ids == first
    assert gen.cache.length <= len(gen.tokens)


@pytest.mark.parametrize("flows", [{"draft": "ngram", "draft_k": 4}, {"draft": "self", "draft_k": 3}])
def test_greedy_speculation_equals_greedy(shared: er.Model, flows: dict) -> None:
    kw = dict(flows)
    if kw["draft"] == "self":
        kw["draft"] = shared
    ids = shared.tokenizer.encode(PROMPT + " " + PROMPT)
    spec = shared.generate(ids, GREEDY, **kw)
    assert spec.token_ids == shared.generate(ids, GREEDY).token_ids
    assert spec.usage.draft_proposed > 0


def test_chat_turns_reuse_the_buffer(shared: er.Model) -> None:
    cfg = er.GenerationConfig(max_new_tokens=6, sampling=er.SamplingConfig(temperature=0))
    chat = er.ChatSession(shared, cfg)
    first = "".join(s.text for s in chat.send("Hello"))
    held = chat.generator.cache.length
    second = "".join(s.text for s in chat.send("And again?"))
    fresh = er.ChatSession(shared, cfg)
    assert "".join(s.text for s in fresh.send("Hello")) == first
    assert "".join(s.text for s in fresh.send("And again?")) == second
    turn1 = shared.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    turn2 = shared.tokenizer.apply_chat_template(chat.messages[:-1])
    assert held > 0 and chat.generator.usage.prompt_tokens < len(turn1) + len(turn2)  # the second kept the first


def test_threads_share_one_model(shared: er.Model) -> None:
    prompts = ["Hello", PROMPT, "The capital of France is"]
    alone = [shared.generate(p, GREEDY).token_ids for p in prompts]
    assert generate_in_threads(shared, prompts, GREEDY) == alone


def test_the_context_cap_sizes_the_buffer(shared_dir: Path) -> None:
    small = er.Model.load(shared_dir, context_size=24)
    assert small.context_length == 24 and small.new_cache().capacity == 24
    ids = small.tokenizer.encode(PROMPT)
    with pytest.raises(er.ContextOverflowError, match="context holds 24"):
        small.generate(ids, GREEDY)
    cache = small.new_cache()
    small.forward(np.array([ids]), cache)
    with pytest.raises(er.ContextOverflowError):
        small.forward(np.zeros((1, 24 - len(ids) + 1), dtype=np.int64), cache)
    assert cache.length == len(ids)  # a refused run changes nothing


def test_the_bound_decode_path_feeds_what_the_contract_says(shared: er.Model) -> None:
    """SharedBinding binds the shared layout's inputs once and updates them in place; a plain ``session.run`` of
    ``GraphContract.feeds`` (the one definition of a run's inputs) gives the same logits, prefill and decode."""
    c = shared.manifest.contract
    ids = shared.tokenizer.encode(PROMPT)
    cache = shared.new_cache()
    bound = [shared.forward(np.array([ids]), cache)[0].copy()]
    for t in (5, 9, 2):
        bound.append(shared.forward(np.array([[t]]), cache)[0].copy())
    outs = shared.session.run(c.output_names(), c.feeds(np.array([ids]), c.empty_past(), 1))
    plain = [outs[0][0, -1]]
    length = len(ids)
    for t in (5, 9, 2):
        past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(c.num_layers)]
        outs = shared.session.run(c.output_names(), c.feeds(np.array([[t]]), past, 1, length))
        plain.append(outs[0][0, -1])
        length += 1
    for a, b in zip(bound, plain, strict=True):
        assert np.allclose(a, b, atol=1e-5), np.abs(a - b).max()
    feeds = c.feeds(np.array([[1, 2], [3, 4]]), c.empty_past(2, 8), 2, np.array([3, 5]))
    assert feeds["seqlens_k"].tolist() == [4, 6] and int(feeds["total_sequence_length"]) == 7
    assert feeds["logits_to_keep"].tolist() == [2] and "attention_mask" not in feeds
    assert feeds["query_seqlens"].tolist() == [2, 2]
    # right-padded rows of different counts (query_seqlens): the bound run and the contract's feeds agree
    ids2 = np.array([ids[:5], [*ids[:3], 0, 0]])
    counts = np.array([5, 3], dtype=np.int32)
    cache = shared.new_cache(2, 16)
    got = cache.run(shared.session, ids2, 5, counts=counts).copy()
    assert cache.lengths.tolist() == [5, 3]
    plain_feeds = c.feeds(ids2, c.empty_past(2, 16), 5, counts=counts)
    assert plain_feeds["seqlens_k"].tolist() == [4, 2] and plain_feeds["query_seqlens"].tolist() == [5, 3]
    want = shared.session.run(c.output_names(), plain_feeds)[0]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1, :3], want[1, :3], atol=1e-5)
