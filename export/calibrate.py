"""Activation statistics for 4-bit weight quantisation: the mean squared input of every weight MatMul, per input
channel, over a built-in calibration text, from the float graph run by onnxruntime (any graph form edgeroute
exports: the fused graph with its shared KV buffer and optimum's). ``quant4`` weighs each channel's rounding
error by it, as llama.cpp's importance matrix does: channels that carry large activations (SmolLM2 has outlier
channels entering the MLP projections) get the finer grid.

The text is edgeroute's own, distinct from the validation text (``edgeroute.quality.QUALITY_TEXT``) so that the quality
figures the export reports are not measured on what the quantiser was fitted to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.contract import GraphContract
from edgeroute.errors import ExportError, ModelLoadError

from .steps import NO_STEP, Step

CHUNK = 256  # tokens per graph run (each run starts from an empty cache)
SMOOTH = 0.1  # importance = mean(x^2) + SMOOTH * its mean over channels: no channel is ignored outright
# ~1,000 tokens (SmolLM2): instructions, answers, lists, code, numbers and narrative, as an assistant sees them.
CALIBRATION_TEXT = (
    "User: Can you explain how a refrigerator keeps food cold?\n"
    "Assistant: A refrigerator moves heat from the inside to the outside. A fluid called the refrigerant is "
    "pumped through a closed loop of pipes. Inside the cabinet it evaporates at a low pressure and absorbs heat "
    "from the air and the food. The compressor then squeezes the warm gas, which raises its temperature, and the "
    "coils at the back release that heat into the kitchen. As the gas cools it condenses back into a liquid, passes "
    "through a narrow valve, and the cycle starts again. That is why the back of a fridge feels warm.\n"
    "User: Write a Python function that returns the n-th prime number.\n"
    "Assistant: Here is a simple version that tests each candidate against the primes found so far:\n"
    "def nth_prime(n: int) -> int:\n"
    "    if n < 1:\n"
    '        raise ValueError("n must be at least 1")\n'
    "    primes = []\n"
    "    candidate = 2\n"
    "    while len(primes) < n:\n"
    "        if all(candidate % p for p in primes if p * p <= candidate):\n"
    "            primes.append(candidate)\n"
    "        candidate += 1\n"
    "    return primes[-1]\n"
    "For n = 10 it returns 29. For large n a sieve of Eratosthenes is much faster.\n"
    "User: List three tips for a job interview.\n"
    "Assistant: 1. Research the company: know what it makes, who its customers are and what it values.\n"
    "2. Prepare short stories from your own experience that show how you solved a problem or worked in a team.\n"
    "3. Ask questions at the end. It shows interest, and the answers help you decide whether you want the job.\n"
    "User: What is 15% of 240, and how do I work it out in my head?\n"
    "Assistant: 15% of 240 is 36. Take 10% first, which is 24, then half of that for 5%, which is 12, and add "
    "them: 24 + 12 = 36. The same trick works for tips at a restaurant.\n"
    "User: Summarise the plot of a story about a lighthouse keeper in two sentences.\n"
    "Assistant: An old lighthouse keeper on a remote island spends his last winter before the light is automated "
    "writing letters to a daughter he has not seen in years. When a storm wrecks a fishing boat nearby, he rescues "
    "its young captain, and the letters he finally sends bring his daughter back to the island in the spring.\n"
    "User: Translate 'Where is the train station?' into French and Spanish.\n"
    "Assistant: French: Où est la gare ? Spanish: ¿Dónde está la estación de tren?\n"
    "User: Why is the sky blue?\n"
    "Assistant: Sunlight contains every colour. When it passes through the atmosphere, the small molecules of "
    "nitrogen and oxygen scatter short wavelengths, blue and violet, far more than long ones such as red. Our eyes "
    "are more sensitive to blue than to violet, and some violet is absorbed high up, so the scattered light that "
    "reaches us from every direction of the sky looks blue. At sunset the light crosses much more air, the blue is "
    "scattered away before it arrives, and the sky near the horizon turns orange and red.\n"
    "User: Give me a JSON object describing a book.\n"
    'Assistant: {"title": "The Silent Orchard", "author": "Mara Lindqvist", "year": 2019, "pages": 312,\n'
    '"genres": ["mystery", "historical"], "available": true}\n'
    "User: How do I make a good cup of tea?\n"
    "Assistant: Boil fresh water, warm the pot or cup first, and use one teaspoon of leaves or one bag per cup. "
    "Black tea likes water just off the boil and three to five minutes of steeping; green tea prefers water at "
    "about 80 degrees Celsius and two or three minutes, or it turns bitter. Remove the leaves when it is done.\n"
    "User: Write a short SQL query that counts orders per customer in 2023.\n"
    "Assistant: SELECT customer_id, COUNT(*) AS orders FROM orders WHERE order_date >= '2023-01-01' AND "
    "order_date < '2024-01-01' GROUP BY customer_id ORDER BY orders DESC;\n"
    "User: What should I pack for a three-day hiking trip?\n"
    "Assistant: A tent or shelter, a sleeping bag rated for the night temperatures, a stove with fuel, food for "
    "each day plus a spare meal, a water filter, a map and compass, a first-aid kit, a headlamp, rain gear, warm "
    "layers and sun protection. Keep the pack under a fifth of your body weight if you can.\n"
    "User: Is it true that we only use ten percent of our brains?\n"
    "Assistant: No. Brain scans show activity across almost the whole brain over the course of a day, and damage "
    "to nearly any region has effects. The myth may come from early research on unexplained functions, or from "
    "self-help books that promised hidden potential.\n"
)


def importance(
    graph_path: Path,
    activations: list[str],
    ids: list[int],
    context: int,
    contract: GraphContract,
    step: Step = NO_STEP,
) -> dict[str, np.ndarray]:
    """``{activation name: importance [channels]}`` for the named graph tensors (each weight MatMul's input), over
    ``ids`` in chunks of at most ``CHUNK`` tokens and ``context`` positions. ``graph_path`` stays as it is: a
    small copy of its proto with the activations as extra outputs reads the same external weights file; its inputs are
    built from ``contract``. ``step`` counts the chunks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(graph_path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in activations if n not in have
    )
    probe = graph_path.with_name(f".edgeroute-calibrate-{os.getpid()}-{graph_path.name}")  # never a user's file
    onnx.save(proto, str(probe))
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(probe), sess_options=so, providers=["CPUExecutionProvider"])
        _check(contract, sess)
        chunk = max(2, min(CHUNK, context))
        sums: dict[str, np.ndarray] = {}
        rows = 0
        starts = range(0, len(ids) - 1, chunk)
        step.total(len(starts))
        for start in starts:
            piece = ids[start : start + chunk]
            outs = sess.run(activations, _feed(contract, piece))
            for name, a in zip(activations, outs, strict=True):
                a = a.reshape(-1, a.shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0.0) + (a * a).sum(axis=0)
            rows += len(piece)
            step.advance()
    finally:
        probe.unlink(missing_ok=True)
    if not rows:
        raise ExportError("calibration needs at least 2 tokens")
    out = {}
    for name, s in sums.items():
        mean = s / rows
        out[name] = (mean + SMOOTH * mean.mean() + 1e-12).astype(np.float32)
    return out


def _check(contract: GraphContract, sess: Any) -> None:
    """Refuse a graph whose inputs are not the ones ``contract`` feeds."""
    try:
        contract.check_session(sess)
    except ModelLoadError as e:
        raise ExportError(f"cannot calibrate: {e}") from None


def _feed(contract: GraphContract, ids: list[int]) -> dict[str, np.ndarray]:
    """Inputs for one prefill of ``ids`` from an empty cache, every position's logits kept (so the LM head's input
    has a row per token)."""
    return contract.feeds(np.array([ids], dtype=np.int64), contract.empty_past(), len(ids))
