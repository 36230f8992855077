"""Quality of a model folder, measured: next-token top-1 agreement and perplexity of its graph over a fixed text.

The export (``edgeroute.export.validate``) runs the text through PyTorch fp32 and through the exported graph and
records the figures with PyTorch's own top-1 token at every position (``reference_top1``), so ``edgeroute bench
--quality`` can measure the folder's graph again, later and without PyTorch, against that reference: a graph whose
weights were changed or zeroed shows it, instead of the figures stored at export time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .sampling import log_softmax

if TYPE_CHECKING:
    from .graph import Graph

# ~950 tokens (SmolLM2) of plain prose (history, science, daily life, a little dialogue and numbers). A short text gave
# figures far off the mark: SmolLM2 int4 measured +10.7% perplexity over 110 tokens and +44% over 1,500.
QUALITY_TEXT = " ".join(
    (
        "The Industrial Revolution began in Great Britain in the late eighteenth century and spread to Europe and",
        "North America. It replaced hand production with machines, new chemical processes and the factory system.",
        "Steam power, fuelled by coal, drove textile mills and locomotives, and cities grew quickly as people moved",
        "from farms to find work. Historians still debate its causes: cheap energy, high wages, access to markets",
        "and a culture of practical invention all played a part. Its effects on living standards were mixed at",
        "first, but over the following century average incomes rose as never before.",
        "Water covers about seventy percent of the surface of the Earth, yet only a small share of it is fresh",
        "water that people can drink. Most fresh water is frozen in glaciers and ice sheets, and much of the rest",
        "lies underground. Rivers and lakes hold less than one percent of it. When the sun warms the oceans, water",
        "evaporates, rises, cools and condenses into clouds; rain and snow return it to the land, where it runs off",
        "into streams or soaks into the soil. This cycle has moved the same water around the planet for billions",
        "of years, and it shapes the weather, the landscape and the places where people choose to live.",
        "A good loaf of bread needs only four ingredients: flour, water, salt and yeast. The baker mixes them into",
        "a dough and kneads it until it becomes smooth and elastic, which develops the gluten that traps the gas",
        "made by the yeast. The dough then rests in a warm place for an hour or two and doubles in size. After it",
        "is shaped, it rises again, and it goes into a hot oven, where the crust turns brown and the kitchen fills",
        "with a smell that few people can resist. Bakers say that patience matters more than any recipe.",
        "The library opened at nine o'clock, and by ten every table near the windows was taken. Students read",
        "quietly, an old man turned the pages of a newspaper, and a child asked the librarian where she could find",
        'books about dinosaurs. "On the second floor," the librarian said, "next to the maps and the atlases."',
        "The girl thanked her and ran up the stairs, and the librarian smiled, because she had asked the very same",
        "question in the very same building more than thirty years before.",
        "Computers store numbers in binary, a system that uses only two digits, zero and one. Each digit is called",
        "a bit, and eight bits make a byte. A single byte can represent two hundred and fifty six different values,",
        "which is enough for a letter of the English alphabet, a digit or a punctuation mark. Larger numbers, and",
        "the characters of other writing systems, need several bytes. Programs are also stored as numbers: the",
        "processor reads them one instruction at a time, and each instruction tells it to move, add, compare or",
        "jump to another place in memory. Everything a computer does is built from steps that simple.",
        "Bees visit flowers to collect nectar and pollen, and in doing so they carry pollen from one flower to the",
        "next, which allows many plants to produce fruit and seeds. A single colony of honey bees can contain tens",
        "of thousands of workers, one queen and a few hundred drones. The workers build the comb, feed the young,",
        "guard the entrance and fly several kilometres in search of food. When a bee finds a rich source, it",
        "returns to the hive and performs a dance that tells the others in which direction to fly and how far.",
        "Farmers in many countries rent hives during the flowering season, because a field of apple trees or",
        "almonds gives a much larger harvest when there are enough bees to visit every blossom.",
        "In the spring of that year the town council decided to repair the old bridge over the river. The work",
        "took four months and cost more than the council had planned, partly because the engineers found that two",
        "of the stone piers were cracked and had to be rebuilt from the foundations. During the repairs, people",
        "crossed the river on a small ferry that ran every twenty minutes from early morning until late evening.",
        "When the bridge finally reopened in August, the mayor cut a ribbon, a band played in the square, and the",
        "ferryman, who had carried nearly forty thousand passengers, was given a medal and a free dinner.",
        "Learning a new language takes time, but a few habits make it easier. It helps to listen every day, even",
        "for a few minutes, to songs, podcasts or the news. Reading simple stories builds vocabulary faster than",
        "lists of words, because each new word appears in a sentence that gives it meaning. Speaking is often the",
        "hardest part, since beginners are afraid of making mistakes, yet mistakes are how everyone learns. Most",
        "teachers agree that regular practice matters more than talent, and that the best time to start is now.",
    )
)


def next_token_figures(logits: np.ndarray, ids: list[int]) -> tuple[np.ndarray, float]:
    """For logits ``[n, vocab]`` over ``ids`` (n tokens): the top-1 token after each of the first n-1 positions,
    and the perplexity of the actual next tokens."""
    nxt = np.asarray(ids[1:])
    logp = np.stack([log_softmax(row.astype(np.float64)) for row in logits[:-1]])
    return logits[:-1].argmax(-1), float(np.exp(-logp[np.arange(len(nxt)), nxt].mean()))


def text_ids(model: Graph, tokens: int | None = None) -> list[int]:
    """The quality text's ids for ``model``: ``tokens + 1`` of them (the count a reference was measured over), or
    as many as the context holds."""
    ids = model.tokenizer.encode(QUALITY_TEXT)
    if tokens is None:
        return ids[: model.context_length]  # tiny test models have short contexts
    ids = ids[: tokens + 1]
    if len(ids) > model.context_length:
        raise ConfigError(
            "context_size", model.context_length, f"the quality text needs {len(ids)} positions (raise --ctx-size)"
        )
    return ids


def measure(model: Graph, reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``model`` over the quality text and return its perplexity and, against a ``reference`` recorded by the
    export (its ``validation.quality``), the top-1 agreement and the perplexity change."""
    ref = dict(reference or {})
    ids = text_ids(model, int(ref["tokens"]) if "tokens" in ref else None)
    logits = model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]
    top1, ppl = next_token_figures(logits, ids)
    out: dict[str, Any] = {"tokens": len(ids) - 1, "perplexity": ppl}
    if "reference_top1" in ref and len(ref["reference_top1"]) == len(top1):
        out["top1_agreement"] = float((top1 == np.asarray(ref["reference_top1"])).mean())
    if "perplexity_reference" in ref:
        out["perplexity_reference"] = float(ref["perplexity_reference"])
        out["perplexity_change_pct"] = 100.0 * (ppl / out["perplexity_reference"] - 1.0)
    return out
