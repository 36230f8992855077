"""SamplingConfig / GenerationConfig: validation names the field, nothing is clamped, configs are frozen."""

from __future__ import annotations

import dataclasses
import math

import pytest
from edgeroute import ConfigError, GenerationConfig, SamplingConfig

BAD_SAMPLING = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("temperature", math.inf),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.0),
    ("typical_p", 0.0),
    ("typical_p", 2.0),
    ("min_keep", 0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("penalty_last_n", -2),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {1: math.inf}),
    ("logit_bias", [1]),
    ("explore", 1.5),
    ("explore", -0.1),
    ("explore_end", 2.0),
    ("explore_steps", -1),
    ("explore_schedule", "cosine"),
    ("seed", -5),
    ("seed", 1.5),
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING)
def test_sampling_config_rejects(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        SamplingConfig(**{field: value})
    assert e.value.field == field
    assert field in str(e.value)


def test_schedules_need_their_settings() -> None:
    with pytest.raises(ConfigError) as e:
        SamplingConfig(explore=0.5, explore_schedule="linear", explore_end=0.0)
    assert e.value.field == "explore_steps"
    with pytest.raises(ConfigError) as e:
        SamplingConfig(explore=0.5, explore_schedule="linear", explore_steps=10)
    assert e.value.field == "explore_end"
    with pytest.raises(ConfigError) as e:
        SamplingConfig(explore=0.5, explore_schedule="exponential", explore_end=0.0, explore_steps=10)
    assert e.value.field == "explore_schedule"


def test_explore_schedules() -> None:
    c = SamplingConfig(explore=0.4)
    assert [c.explore_at(s) for s in (0, 5, 100)] == [0.4, 0.4, 0.4]
    lin = SamplingConfig(explore=0.4, explore_end=0.0, explore_steps=4, explore_schedule="linear")
    assert [round(lin.explore_at(s), 12) for s in (0, 1, 2, 4, 9)] == [0.4, 0.3, 0.2, 0.0, 0.0]
    exp = SamplingConfig(explore=0.8, explore_end=0.05, explore_steps=4, explore_schedule="exponential")
    assert [round(exp.explore_at(s), 12) for s in (0, 1, 2, 4, 9)] == [0.8, 0.4, 0.2, 0.05, 0.05]


BAD_GENERATION = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 1.0),
    ("min_new_tokens", -1),
    ("min_new_tokens", 10**6),
    ("stop", ("",)),
    ("stop", (1,)),
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", ("a",)),
    ("logprobs", 50),
    ("logprobs", -1),
    ("logprobs", "yes"),
    ("sampling", {"temperature": 0}),
    ("prefill_chunk", 0),
]


@pytest.mark.parametrize(("field", "value"), BAD_GENERATION)
def test_generation_config_rejects(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**{field: value})
    assert e.value.field == field


def test_configs_are_frozen_and_normalised() -> None:
    cfg = GenerationConfig(stop="\n\n", stop_token_ids=[3, 4], sampling=SamplingConfig(logit_bias={5: -math.inf}))
    assert cfg.stop == ("\n\n",) and cfg.stop_token_ids == (3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_new_tokens = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.sampling.logit_bias[6] = 1.0  # type: ignore[index]
    assert cfg.replace(max_new_tokens=7).max_new_tokens == 7
    with pytest.raises(ConfigError):
        cfg.replace(max_new_tokens=-7)
    assert GenerationConfig().max_new_tokens <= 512  # a modest default, never "the whole context"
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig().greedy
