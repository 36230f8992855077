"""Adapters kept apart from the base at export (``edgeroute export BASE OUT --lora NAME=DIR --lora-rank R``): the
graph's LoRA layout chosen from the options and the adapters given, each adapter written beside the base
(``edgeroute.adapter_folder.add_to_folder``) and checked against PEFT in PyTorch on the validation text.

fp32 bases must match PEFT within the export's tolerance (``validate.FP32_TOLERANCE``) at every position; int8 and
int4 bases report top-1 agreement with PEFT (the base's weights are rounded, the adapter's are not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.adapter_folder import add_to_folder
from edgeroute.adapters import Adapter, read_adapter
from edgeroute.errors import ConfigError, ExportValidationError

from .fused import lora_layout

ADAPTER_CHECK_TEXT = (
    "The committee met on Tuesday to review the budget. After a long discussion about schools, roads and the new"
    " library, they agreed to meet again next month."
)


def read_all(loras: Mapping[str, Any]) -> dict[str, Adapter]:
    """Every ``--lora NAME=DIR`` read and checked for what edgeroute runs (before anything heavy)."""
    return {name: read_adapter(path, name) for name, path in loras.items()}


def choose_layout(
    model: Any, rank: int | None, targets: Sequence[str] | None, adapters: Mapping[str, Adapter]
) -> dict[str, Any]:
    """The manifest's ``lora``: ``rank`` (default: the largest of the adapters'), ``targets`` (default: the modules
    the adapters change, or every linear module when none is given)."""
    if rank is None:
        if not adapters:
            raise ConfigError("lora_rank", rank, "give the graph's adapter rank (or adapters to take it from)")
        rank = max(a.rank for a in adapters.values())
    if targets is None and adapters:
        targets = sorted({m for a in adapters.values() for m in a.modules})
    return lora_layout(model, rank, tuple(targets) if targets is not None else None)


def add_all(
    folder: Path, loras: Mapping[str, Any], base: Any, tokenizer: Any, quantized: bool, validate: bool = True
) -> None:
    """Write each adapter into ``folder`` and (``validate``) compare the graph with it against PEFT over the check
    text; the figures go into the adapter's manifest entry (``validation``)."""
    from edgeroute import Model
    from edgeroute.folder_io import update_json
    from edgeroute.manifest import MANIFEST_NAME

    from .validate import FP32_TOLERANCE

    for name, path in loras.items():
        add_to_folder(folder, name, path, lock=False)  # the export's own temporary folder
    checked = [name for name, path in loras.items() if validate and Path(path).expanduser().is_dir()]
    if not checked:  # edgeroute adapter files have no PEFT folder to compare with
        return
    model = Model.load(folder)  # with every adapter the folder lists
    ids = np.array([tokenizer.encode(ADAPTER_CHECK_TEXT)], dtype=np.int64)
    reports = {}
    for name in checked:
        want = _peft_logits(base, Path(loras[name]).expanduser(), tokenizer)
        got = model.forward_last(ids, model.new_cache(adapter=name), ids.shape[1])[0]
        diff = float(np.abs(got - want).max())
        top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        reports[name] = {"max_abs_logit_diff": diff, "top1_agreement": top1, "tokens": int(ids.shape[1])}
        if not quantized and diff > FP32_TOLERANCE:
            raise ExportValidationError(
                f"adapter {name!r}: the graph with it differs from PEFT by {diff:.2e} (> {FP32_TOLERANCE:g})"
            )

    def add(data: dict[str, Any]) -> None:
        for name, report in reports.items():
            data["adapters"][name]["validation"] = report

    update_json(folder / MANIFEST_NAME, add, lock=False)  # the export's own temporary folder


def _peft_logits(base: Any, adapter_dir: Path, tokenizer: Any) -> np.ndarray:
    """PEFT's logits of the check text with the adapter on ``base`` (taken off again afterwards)."""
    import torch
    from peft import PeftModel

    ids = torch.tensor([tokenizer.encode(ADAPTER_CHECK_TEXT)])
    wrapped = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    try:
        with torch.no_grad():
            return wrapped(ids).logits[0].float().numpy()
    finally:
        wrapped.unload()  # the base model without the adapter's layers, as it was
