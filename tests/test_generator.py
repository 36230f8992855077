"""Model, KV cache and Generator on the tiny synthetic graph: decode loop, variants, batch, threads, stops,
rewind, logprobs, errors."""

from __future__ import annotations

from pathlib import Path

import edgeroute as er
import numpy as np
import pytest
from conftest import GREEDY, generate_in_threads

PROMPT = "The capital of France is"


def full_logits(model: er.Model, ids: list[int]) -> np.ndarray:
    """Last-position logits from one graph run over all ids with an empty cache (no incremental decoding)."""
    return model.forward(np.array([ids]), model.new_cache())[0]


def test_greedy_decode_equals_recomputation_from_scratch(tiny: er.Model) -> None:
    ids = tiny.tokenizer.encode(PROMPT)
    out = tiny.generate(PROMPT, GREEDY)
    stopped = len(out.token_ids) < GREEDY.max_new_tokens
    assert out.finish_reason == ("stop" if stopped else "length") and len(out.token_ids) > 5
    seq = list(ids)
    for tok in out.token_ids:  # each cached step agrees with running the whole sequence again
        assert tok == int(np.argmax(full_logits(tiny, seq)))
        seq.append(tok)


def test_kv_cache_logits_match_full_run(tiny: er.Model) -> None:
    ids = tiny.tokenizer.encode("Once upon a time a little robot")
    cache = tiny.new_cache()
    tiny.forward(np.array([ids[:-3]]), cache)
    for i in range(len(ids) - 3, len(ids)):
        step = tiny.forward(np.array([ids[i : i + 1]]), cache)[0]
        assert np.allclose(step, full_logits(tiny, ids[: i + 1]), atol=1e-5)
    assert cache.length == len(ids)
    assert cache.nbytes == 2 * 2 * 1 * 2 * len(ids) * 8 * 4  # layers * (k,v) * batch * heads * len * dim * 4
    copy = cache.copy()
    cache.trim(2)
    assert cache.length == len(ids) - 2 and copy.length == len(ids)


@pytest.mark.parametrize(
    "variant",
    [
        {"position_ids": False},
        {"kv_dtype": "float16"},
        {"logits": "last"},
        {"num_layers": 3, "num_kv_heads": 1, "head_size": 4},
        {"num_layers": 1, "num_kv_heads": 4, "head_size": 16, "position_ids": False, "kv_dtype": "float16"},
    ],
    ids=["no_position_ids", "fp16_kv", "last_logits", "geometry", "mixed"],
)
def test_graph_variants_decode_correctly(make_tiny, variant: dict) -> None:
    model = er.Model.load(make_tiny(**variant))
    ids = model.tokenizer.encode(PROMPT)
    out = model.generate(PROMPT, GREEDY)
    seq = list(ids)
    tol = 1e-2 if variant.get("kv_dtype") == "float16" else 1e-5
    for tok in out.token_ids[:8]:
        ref = full_logits(model, seq)
        assert ref[tok] >= ref.max() - tol
        seq.append(tok)
    assert model.generate([PROMPT, "Hi"], GREEDY)[0].token_ids == out.token_ids


def test_chunked_prefill_equals_one_shot(tiny: er.Model) -> None:
    prompt = "Once upon a time a little robot learned to paint the sea and the sky. " * 2
    a = tiny.generate(prompt, GREEDY)
    b = tiny.generate(prompt, GREEDY.replace(prefill_chunk=5))
    assert a.token_ids == b.token_ids and a.text == b.text


def test_generator_streams_steps_and_usage(tiny: er.Model) -> None:
    cfg = GREEDY.replace(max_new_tokens=10)
    gen = tiny.generator(cfg)
    ids = tiny.tokenizer.encode(PROMPT)
    gen.append(ids)
    steps = list(gen)
    assert len(steps) == 10 and steps[-1].finish_reason == "length"
    assert all(s.finish_reason is None for s in steps[:-1])
    assert gen.done and gen.finish_reason == "length"
    assert gen.tokens == ids + [s.token_id for s in steps]
    assert gen.usage.prompt_tokens == len(ids) and gen.usage.completion_tokens == 10
    assert gen.usage.time_to_first_token is not None and gen.usage.tokens_per_second > 0
    with pytest.raises(StopIteration):
        gen.step()
    assert [s.token_id for s in steps] == tiny.generate(ids, cfg).token_ids


def test_multi_turn_append_reuses_the_cache(tiny: er.Model) -> None:
    cfg = GREEDY.replace(max_new_tokens=6)
    tok = tiny.tokenizer
    gen = tiny.generator(cfg)
    first = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    gen.append(first)
    a = [s.token_id for s in gen]
    length_before = gen.cache.length
    follow = tok.encode("\nAnd again?", add_special_tokens=False)
    gen.append(follow)
    assert gen.cache.length == length_before + 1 + len(follow)  # only the new tokens (and the last) were fed
    b = [s.token_id for s in gen]
    fresh = tiny.generator(cfg)
    fresh.append(first + a + follow)
    assert [s.token_id for s in fresh] == b


def test_rewind(tiny: er.Model) -> None:
    cfg = GREEDY.replace(max_new_tokens=12)
    gen = tiny.generator(cfg)
    ids = tiny.tokenizer.encode(PROMPT)
    gen.append(ids)
    first = [s.token_id for s in gen]
    gen.rewind(5)
    assert gen.tokens == ids + first[:-5] and not gen.done
    again = [s.token_id for s in gen]
    assert again == first[-5:]  # greedy: the same continuation from the rewound point
    gen.rewind(len(first) + 2)  # into the prompt
    assert gen.tokens == ids[:-2]
    assert [s.token_id for s in gen][:3] == tiny.generate(ids[:-2], cfg).token_ids[:3]
    with pytest.raises(er.ConfigError):
        gen.rewind(10_000)


def test_sampling_is_seeded(tiny: er.Model) -> None:
    cfg = er.GenerationConfig(max_new_tokens=16, sampling=er.SamplingConfig(temperature=1.0, top_p=0.95, seed=7))
    a = tiny.generate(PROMPT, cfg).token_ids
    assert a == tiny.generate(PROMPT, cfg).token_ids
    assert a != tiny.generate(PROMPT, cfg.replace(sampling=cfg.sampling.replace(seed=8))).token_ids


def test_batch_equals_each_prompt_alone(tiny: er.Model) -> None:
    prompts = [PROMPT, "Hi", "Once upon a time a little robot learned to paint", "日本語 🤖"]
    cfg = GREEDY.replace(max_new_tokens=16)
    batch = tiny.generate(prompts, cfg)
    for p, c in zip(prompts, batch, strict=False):
        alone = tiny.generate(p, cfg)
        assert c.token_ids == alone.token_ids and c.text == alone.text and c.finish_reason == alone.finish_reason
    seeded = cfg.replace(sampling=er.SamplingConfig(temperature=1.0, seed=3))
    assert [c.token_ids for c in tiny.generate(prompts, seeded)] == [
        c.token_ids for c in tiny.generate(prompts, seeded)
    ]


def test_batch_with_stops_of_different_lengths(tiny: er.Model) -> None:
    prompts = [PROMPT, "Hello world!"]
    alone = [tiny.generate(p, GREEDY) for p in prompts]
    stop_tok = alone[0].token_ids[3]  # make row 0 stop early on a token it generates
    cfg = GREEDY.replace(stop_token_ids=(stop_tok,))
    batch = tiny.generate(prompts, cfg)
    for p, c in zip(prompts, batch, strict=False):
        assert c.token_ids == tiny.generate(p, cfg).token_ids
    assert batch[0].finish_reason == "stop" and len(batch[0].token_ids) <= 3


def test_threads_share_one_model(tiny: er.Model) -> None:
    prompts = [PROMPT, "Hi there", "Once upon a time", "Hello world!"]
    cfg = GREEDY.replace(max_new_tokens=20)
    sequential = [tiny.generate(p, cfg).token_ids for p in prompts]
    assert generate_in_threads(tiny, prompts, cfg) == sequential


def test_eos_stops_and_is_not_in_the_output(tiny: er.Model) -> None:
    base = tiny.generate(PROMPT, GREEDY)
    eos = tiny.manifest.eos_token_ids[0]
    cfg = GREEDY.replace(sampling=er.SamplingConfig(temperature=0, logit_bias={eos: 100.0}))
    out = tiny.generate(PROMPT, cfg)
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""
    forced = GREEDY.replace(min_new_tokens=5, sampling=cfg.sampling)
    out = tiny.generate(PROMPT, forced)
    assert out.finish_reason == "stop" and len(out.token_ids) == 5
    assert eos not in out.token_ids
    assert base.token_ids and base.token_ids[0] != eos  # the plain run did not stop at once: the bias did


def test_stop_token_ids_and_stop_strings(tiny: er.Model) -> None:
    base = tiny.generate(PROMPT, GREEDY)
    third = base.token_ids[2]
    out = tiny.generate(PROMPT, GREEDY.replace(stop_token_ids=(third,)))
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(third)]
    # a stop string that spans tokens: take text from the middle of the greedy output
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = tiny.generate(PROMPT, GREEDY.replace(stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert stop not in out.text
    gen = tiny.generator(GREEDY.replace(stop=(stop,)))
    gen.append(tiny.tokenizer.encode(PROMPT))
    streamed = "".join(s.text for s in gen)
    assert streamed == out.text


def test_logprobs(tiny: er.Model) -> None:
    cfg = GREEDY.replace(max_new_tokens=5, logprobs=3)
    out = tiny.generate(PROMPT, cfg)
    assert out.logprobs is not None and len(out.logprobs) == 5
    seq = tiny.tokenizer.encode(PROMPT)
    for lp in out.logprobs:
        ref = full_logits(tiny, seq).astype(np.float64)
        ref = ref - (ref.max() + np.log(np.exp(ref - ref.max()).sum()))
        assert lp.logprob == pytest.approx(ref[lp.token_id], abs=1e-4)
        assert [i for i, _ in lp.top] == list(np.argsort(-ref)[:3])
        assert lp.top[0][0] == lp.token_id  # greedy picks the top alternative
        seq.append(lp.token_id)
    only = tiny.generate(PROMPT, GREEDY.replace(max_new_tokens=3, logprobs=True))
    assert only.logprobs is not None and all(lp.top == () for lp in only.logprobs)
    assert tiny.generate(PROMPT, GREEDY.replace(max_new_tokens=3)).logprobs is None


def test_context_overflow(tiny: er.Model) -> None:
    ids = tiny.tokenizer.encode(PROMPT)
    cfg = GREEDY.replace(max_new_tokens=tiny.context_length - len(ids) + 1)
    with pytest.raises(er.ContextOverflowError) as e:
        tiny.generate(PROMPT, cfg)
    assert e.value.context_length == tiny.context_length
    gen = tiny.generator(GREEDY)
    with pytest.raises(er.ContextOverflowError):
        gen.append([5] * tiny.context_length)
    assert gen.tokens == [] and gen.cache.length == 0  # nothing half-written
    with pytest.raises(er.ContextOverflowError):
        tiny.generate([PROMPT, "x" * 600], GREEDY)
    ok = tiny.generate(PROMPT, GREEDY.replace(max_new_tokens=tiny.context_length - len(ids)))
    assert len(ok.token_ids) <= tiny.context_length - len(ids)


def test_bad_prompts(tiny: er.Model) -> None:
    with pytest.raises(er.ConfigError):
        tiny.generate(3.5)  # type: ignore[arg-type]
    with pytest.raises(er.ConfigError):
        tiny.generate([10**6])
    gen = tiny.generator(GREEDY)
    with pytest.raises(er.ConfigError):
        gen.append([-1])
    with pytest.raises(StopIteration):
        gen.step()  # nothing appended: nothing to generate


def test_onnxruntime_failures_are_wrapped(tiny: er.Model) -> None:
    cache = tiny.new_cache()
    with pytest.raises(er.InferenceError) as e:
        tiny.forward(
            np.array([[1, 2]]), cache, attention_mask=np.ones((1, 7), dtype=np.int64), position_ids=np.array([[0, 1]])
        )
    assert e.value.__cause__ is not None


def test_model_repr_and_defaults(tiny: er.Model, tiny_dir: Path) -> None:
    assert "layers=2" in repr(tiny)
    out = tiny.generate("Hi")  # the default config works: up to 256 tokens
    assert out.finish_reason == ("length" if len(out.token_ids) == 256 else "stop") and out.token_ids


def test_spin_off_for_models_used_in_turn(tiny: er.Model, tiny_dir: Path) -> None:
    quiet = er.Model.load(tiny_dir, spin=False)
    opts = quiet.session.get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert tiny.generate(PROMPT, GREEDY).token_ids == quiet.generate(PROMPT, GREEDY).token_ids
    assert tiny.generate(PROMPT, GREEDY, draft=quiet).token_ids == quiet.generate(PROMPT, GREEDY).token_ids
