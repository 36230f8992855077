"""The texts a run reads: the built-in prompt set, and prompts or reference texts from a file."""

from __future__ import annotations

import json
from pathlib import Path

from edgeroute.errors import ConfigError

# The built-in prompt set: short prompts of several kinds, written for edgeroute (stories, explanations, lists,
# advice, descriptions, dialogue, verse, opinions), where many different answers are good ones.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("story", "Write the opening lines of a story about a lighthouse keeper who finds a message in a bottle."),
    ("story", "Tell a short story about a robot that wants to learn how to cook."),
    ("story", "Begin a story set in a city where it has not rained for ten years."),
    ("story", "Write a short fable about a fox and a crow who become friends."),
    ("story", "Describe the first day of a new student at a school for wizards."),
    ("explain", "Explain why the sky is blue to a ten-year-old."),
    ("explain", "Explain how a bicycle stays upright when it moves."),
    ("explain", "What causes the seasons on Earth?"),
    ("explain", "Explain what a computer's memory does."),
    ("explain", "Why do we need to sleep?"),
    ("list", "Give some ideas for a rainy afternoon at home."),
    ("list", "List a few good habits for learning a new language."),
    ("list", "Suggest names for a small bakery by the sea."),
    ("list", "What are some things to pack for a weekend of camping?"),
    ("advice", "How can I make my mornings less stressful?"),
    ("advice", "Give advice to someone who is nervous about speaking in public."),
    ("advice", "How should I start running if I have never done sport?"),
    ("advice", "What is a good way to keep a small garden on a balcony?"),
    ("describe", "Describe a busy market early in the morning."),
    ("describe", "Describe the taste of a ripe peach."),
    ("describe", "Describe a forest after a storm."),
    ("describe", "Describe your ideal house."),
    ("dialogue", "Write a short conversation between a customer and a shopkeeper who sells only hats."),
    ("dialogue", "Write a dialogue in which two friends plan a trip to the mountains."),
    ("dialogue", "Write what a cat might say to its owner if it could talk."),
    ("verse", "Write a short poem about the moon."),
    ("verse", "Write a few lines of verse about autumn leaves."),
    ("verse", "Write a haiku about the sea."),
    ("opinion", "Is it better to live in a city or in the countryside? Give your view."),
    ("opinion", "What makes a good teacher?"),
    ("opinion", "Should every child learn to play a musical instrument?"),
    ("opinion", "What is the most useful invention of the last hundred years, and why?"),
)


def read_texts(path: str | Path, key: str = "prompt") -> list[str]:
    """One text per non-empty line, or JSON Lines with a ``key`` (or ``"text"``) field."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(str(path), f"line {n}", f"is not valid JSON ({e.msg})") from None
            value = obj.get(key, obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(str(path), f"line {n}", f'needs a non-empty "{key}" or "text" string')
            line = value
        out.append(line)
    if not out:
        raise ConfigError(str(path), "empty", "holds no text")
    return out
