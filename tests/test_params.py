"""Requests to configs: one function turns plain parameters (OpenAI's names and edgeroute's) into validated configs,
for the CLI, the API and a server alike."""

from __future__ import annotations

import math

import edgeroute as er
import pytest


def test_openai_names_map_to_the_configs() -> None:
    cfg, flows = er.from_params(
        {
            "max_tokens": 12,
            "min_tokens": 2,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": -1,  # vLLM's "off"
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "stop": ["\n\n", "###"],
            "seed": 7,
            "logit_bias": {"42": -100, "7": 5},  # JSON object keys are strings
            "logprobs": True,
            "top_logprobs": 3,
            "user": None,  # None means "not given"
        }
    )
    s = cfg.sampling
    assert (cfg.max_new_tokens, cfg.min_new_tokens, cfg.stop, cfg.logprobs) == (12, 2, ("\n\n", "###"), 3)
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.7, 0.9, 0, 7)
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)
    assert dict(s.logit_bias) == {42: -100.0, 7: 5.0}
    assert not flows.active


def test_edgeroute_names_and_defaults() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64}
    cfg, _ = er.from_params({"top_p": 0.5, "min_p": 0.05, "explore": 0.1, "repetition_penalty": 1.1}, defaults)
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.max_new_tokens) == (0.6, 0.5, 64)  # params win
    assert (cfg.sampling.min_p, cfg.sampling.explore, cfg.sampling.repetition_penalty) == (0.05, 0.1, 1.1)
    assert er.from_params({})[0] == er.GenerationConfig()
    assert er.from_params({"logprobs": 2})[0].logprobs == 2  # completions' integer form
    assert er.from_params({"logprobs": 0})[0].logprobs is True
    assert er.from_params({"logprobs": True})[0].logprobs is True


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ({"temprature": 0.5}, "temprature", "not a generation parameter"),
        ({"max_tokens": 0}, "max_tokens", "integer >= 1"),  # named as the request spelled it
        ({"max_tokens": 5, "max_new_tokens": 6}, "max_new_tokens", "conflicts with max_tokens=5"),
        ({"temperature": "hot"}, "temperature", "0 (greedy) or in"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 1e9}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": [1, 2]}, "logit_bias", "must map"),
        ({"top_logprobs": 3, "logprobs": False}, "top_logprobs", "needs logprobs"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs", "[0, 20]"),
        ({"logprobs": "yes"}, "logprobs", "bool or an integer"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"guidance": math.inf}, "guidance", "[-100, 100]"),
        ({"negative_prompt": "x"}, "negative_prompt", "needs guidance"),
        ({"draft": "ngram", "guidance": 2.0}, "flows", "one of"),
        ({"draft": "ngram", "draft_k": "many"}, "draft_k", "positive integer or 'auto'"),
        ({"draft": "ngram", "draft_k": 0}, "draft_k", ">= 1"),
        ({"draft": "models/other"}, "draft", "cannot load"),
        ({"contrast_alpha": 11}, "contrast_alpha", "[0, 10]"),
    ],
)
def test_bad_parameters_name_the_parameter(params: dict, field: str, fragment: str) -> None:
    with pytest.raises(er.ConfigError) as e:
        er.from_params(params)
    assert e.value.field == field and fragment in str(e.value)


def test_flows_from_params(tiny: er.Model) -> None:
    _, f = er.from_params({"draft": "ngram", "draft_k": "auto"})
    assert (f.draft, f.draft_k, f.adaptive_k) == ("ngram", 4, True)
    loaded: list[str] = []

    def load(name: str) -> er.Model:
        loaded.append(name)
        return tiny

    cfg, f = er.from_params({"contrast": "small", "contrast_alpha": 0.3, "temperature": 0}, load=load)
    assert f.contrast is tiny and f.contrast_alpha == 0.3 and loaded == ["small"]
    ids = tiny.tokenizer.encode("Hello")
    assert tiny.generate(ids, cfg, f).token_ids == tiny.generate(ids, cfg, contrast=tiny, contrast_alpha=0.3).token_ids
    _, g = er.from_params({"guidance": 2, "negative_prompt": "Once"})
    assert g.guidance == 2.0 and g.active


def test_flows_and_their_fields_are_one_or_the_other(tiny: er.Model) -> None:
    with pytest.raises(er.ConfigError, match="not both"):
        tiny.generator(er.GenerationConfig(), er.Flows(guidance=2.0), draft="ngram")
    with pytest.raises(er.ConfigError, match="not a flow setting"):
        tiny.generator(er.GenerationConfig(), drafts="ngram")
    with pytest.raises(er.ConfigError, match="single-stream"):
        tiny.generate(["a", "b"], er.GenerationConfig(), er.Flows(draft="ngram"))
