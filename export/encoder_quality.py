"""int8 (and fp16) encoders and their quality gate (issue 36).

An encoder's int8 export is onnxruntime's dynamic quantisation of the validated fp32 graph (signed int8 weights
ahead of time, a scale per output channel unless asked per tensor; activations quantised per run; no graph fusion:
onnxruntime's BERT fusions measured slower on these CPUs). Then the export measures the int8 model against the
fp32 one on a text set (:data:`QUALITY_TEXTS`, or the user's) by what the task answers:

- embeddings: each text's cosine between the two embeddings (min and mean), and retrieval agreement: for each
  text whose nearest other text (fp32) leads the second by :data:`RETRIEVAL_GAP` in cosine, whether it is the
  same under both (a near tie may swap under any rounding);
- classifiers: top-label agreement (and the largest score change);
- token classifiers: entity-level F1 of the int8 entities against the fp32 entities (same label and span;
  ``simple`` aggregation), and tag agreement over tokens.

An fp16 export (for CUDA) is measured and gated the same way (onnxruntime's CPU provider runs fp16 graphs).

A model below a threshold of :data:`GATES` is refused (``QualityGateError``: nothing is written) unless the user
forces it (``force_quality``); the measures, the thresholds and whether it was forced go into the manifest
(``provenance.quality``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.encoder import EncoderModel
from edgeroute.errors import ConfigError, ExportValidationError

# the measures each task's int8 (fp16) model must reach against its fp32 model: set where per-channel int8 of
# all-MiniLM-L6-v2 and of a MiniLM NER fine-tune pass and per-tensor int8 (visibly worse) does not (docs/encoders.md)
GATES: dict[str, tuple[tuple[str, float], ...]] = {
    "embedding": (("min_cosine", 0.98), ("mean_cosine", 0.99), ("retrieval_agreement", 0.95)),
    "classification": (("label_agreement", 0.95),),
    "token-classification": (("entity_f1", 0.95), ("tag_agreement", 0.99)),
}
RETRIEVAL_GAP = 0.02  # retrieval agreement counts the texts whose fp32 nearest neighbour leads by this much
MAX_QUALITY_TEXTS = 4096  # (one call of the model: its MAX_TEXTS)


class QualityGateError(ExportValidationError):
    """The int8 export falls below the quality gate (and was not forced)."""


QUALITY_TEXTS = [
    "The capital of France is Paris.",
    "Angela Merkel met Emmanuel Macron in Berlin on Tuesday.",
    "Apple opened a new office in Munich last spring.",
    "The river Thames flows through London and Oxford.",
    "I loved this film: the acting was superb and the music moving.",
    "The service was slow and the food arrived cold.",
    "What a waste of money, it broke after two days.",
    "Absolutely delighted with the purchase, would buy again.",
    "The meeting is moved to Thursday at three in the afternoon.",
    "Bees carry pollen from flower to flower.",
    "A little robot learned to paint the sea and the sky.",
    "Stocks fell sharply after the central bank raised interest rates.",
    "The new phone has a faster chip and a brighter screen.",
    "Marie Curie won the Nobel Prize in Physics and in Chemistry.",
    "The World Health Organization is based in Geneva.",
    "Heavy rain is expected across the north of Scotland tomorrow.",
    "Please reset my password, I cannot log in.",
    "How do I cancel my subscription?",
    "The train from Madrid to Barcelona takes about three hours.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The match ended in a draw after extra time.",
    "Serena Williams won twenty-three Grand Slam singles titles.",
    "Toyota recalled thousands of cars over a brake fault.",
    "The museum in Amsterdam holds many paintings by Rembrandt.",
    "My order never arrived and nobody answers the phone.",
    "The hotel room was clean, quiet and close to the station.",
    "Researchers at Stanford published a new study on sleep.",
    "A volcano erupted in Iceland, disrupting flights across Europe.",
    "The recipe needs two eggs, flour, butter and a pinch of salt.",
    "Python is a popular programming language for data science.",
    "The committee will vote on the proposal next week.",
    "She moved from Lisbon to Tokyo to study architecture.",
    "The concert was cancelled because the singer fell ill.",
    "Microsoft and OpenAI announced a new partnership.",
    "The battery lasts all day, but charging is slow.",
    "Dogs need regular exercise and a balanced diet.",
    "The Amazon rainforest spans nine countries in South America.",
    "Inflation in the euro area slowed to two percent.",
    "He forgot his umbrella and got soaked on the way home.",
    "The software update fixed the crash but drained the battery.",
    "Nelson Mandela was released from prison in 1990.",
    "The bakery on Main Street sells the best croissants in town.",
    "Kenya's runners dominated the Boston Marathon again.",
    "Customer support solved my problem within minutes.",
    "The bridge will be closed for repairs until March.",
    "Quantum computers use qubits instead of bits.",
    "The film is too long and the plot makes little sense.",
    "Samsung reported record profits in the third quarter.",
    "Mount Everest is the highest mountain on Earth.",
    "Our flight to Sydney was delayed by six hours.",
    "The teacher explained the theorem with a simple drawing.",
    "Barcelona signed a young striker from Brazil.",
    "The cat slept on the warm windowsill all afternoon.",
    "Prices at the market in Marrakesh are negotiable.",
    "The European Parliament approved the new privacy rules.",
    "I would not recommend this laptop to anyone.",
    "Ludwig van Beethoven was born in Bonn in 1770.",
    "The startup raised ten million dollars from investors in Silicon Valley.",
    "Fresh snow closed several roads in the Alps.",
    "The app is easy to use and the design is beautiful.",
    "NASA plans to send astronauts back to the Moon.",
    "The library opens at nine and closes at six.",
    "The defendant denied all charges in court on Monday.",
    "Green tea contains less caffeine than coffee.",
]


def quantize_int8(source: Path, target: Path, per_channel: bool) -> None:
    """onnxruntime's dynamic int8 quantisation of the fp32 graph ``source`` into ``target`` (signed int8 weights:
    :func:`quantize_int8` settings are measured in docs/models.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=False,
        extra_options={"MatMulConstBOnly": True},
    )


def cast_fp16(source: Path, target: Path) -> None:
    """The fp32 graph ``source`` cast to fp16 (weights and activations; inputs and outputs kept as they were:
    onnxruntime's ``convert_float_to_float16``) into ``target``. For CUDA; onnxruntime's CPU provider runs it too
    (slower than fp32), which is how the export measures it."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


def read_quality_texts(path: str | Path | None) -> list[str]:
    """The text set of the gate: one text per non-blank line of ``path`` (UTF-8), or the built-in one."""
    if path is None:
        return list(QUALITY_TEXTS)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("quality_texts", str(path), f"cannot be read as UTF-8 text: {e}") from None
    texts = [x.strip() for x in lines if x.strip()]
    if len(texts) < 2 or len(texts) > MAX_QUALITY_TEXTS:
        raise ConfigError("quality_texts", str(path), f"must hold 2 to {MAX_QUALITY_TEXTS} non-blank lines")
    return texts


def measure(reference: EncoderModel, quantized: EncoderModel, texts: Sequence[str]) -> dict[str, Any]:
    """The int8 model's measures against the fp32 model on ``texts`` (module docstring); long texts are cut."""
    task = reference.task
    out: dict[str, Any] = {"texts": len(texts)}
    if task == "embedding":
        a = reference.embed(texts, normalize=True, overflow="truncate").vectors
        b = quantized.embed(texts, normalize=True, overflow="truncate").vectors
        cos = (a * b).sum(1)
        out |= {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        clear = _gap(a) >= RETRIEVAL_GAP
        out["retrieval_agreement"] = float((_nearest(a) == _nearest(b))[clear].mean()) if clear.any() else 1.0
        out["retrieval_texts"] = int(clear.sum())
    elif task == "classification":
        la = reference.classify(texts, top_k=None, overflow="truncate")
        lb = quantized.classify(texts, top_k=None, overflow="truncate")
        out["label_agreement"] = float(np.mean([x[0].label == y[0].label for x, y in zip(la, lb, strict=True)]))
        out["max_score_change"] = max(
            abs(s.score - {t.label: t.score for t in y}[s.label]) for x, y in zip(la, lb, strict=True) for s in x
        )
    else:
        ea = reference.entities(texts, overflow="truncate")
        eb = quantized.entities(texts, overflow="truncate")
        want = {(i, e.label, e.start, e.end) for i, es in enumerate(ea) for e in es}
        got = {(i, e.label, e.start, e.end) for i, es in enumerate(eb) for e in es}
        hit = len(want & got)
        f1 = 1.0 if not want and not got else 2 * hit / (len(want) + len(got))
        tags_a = reference.entities(texts, aggregation="none", ignore_labels=(), overflow="truncate")
        tags_b = quantized.entities(texts, aggregation="none", ignore_labels=(), overflow="truncate")
        same = [x.label == y.label for p, q in zip(tags_a, tags_b, strict=True) for x, y in zip(p, q, strict=True)]
        out |= {"entity_f1": f1, "entities": len(want), "tag_agreement": float(np.mean(same))}
    return out


def _nearest(vectors: np.ndarray) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1)


def _gap(vectors: np.ndarray) -> np.ndarray:
    """Each text's cosine lead of its nearest other text over the second nearest."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    top = np.sort(sims, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def gate(task: str, quality: dict[str, Any], force: bool, precision: str = "int8") -> dict[str, Any]:
    """``quality`` with the thresholds, whether it passed and whether it was forced; a ``QualityGateError``
    naming the measure below its threshold unless ``force``."""
    failed = [(name, quality[name], least) for name, least in GATES[task] if quality[name] < least]
    result = {**quality, "thresholds": dict(GATES[task]), "passed": not failed, "forced": bool(failed and force)}
    if failed and not force:
        name, value, least = failed[0]
        raise QualityGateError(
            f"the {precision} model's {name.replace('_', ' ')} against fp32 is {value:.4f} < {least} on"
            f" {quality['texts']} texts: it loses too much at {precision}; export fp32"
            ", or pass --force-quality to write it anyway"
        )
    return result
