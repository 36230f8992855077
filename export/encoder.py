"""Encoder exports (issue 36, first part): sentence-transformers embedding folders -> an edgeroute model folder.

A sentence-transformers folder (``modules.json``: a Transformer module, then ``Pooling`` and optionally
``Normalize``) is exported as its Transformer alone: the graph computes ``last_hidden_state`` (optimum's
``feature-extraction`` export of the checkpoint), and the pooling (``1_Pooling/config.json``: mean, cls, max,
mean of square-root length, last token), the normalisation and the maximum length (``sentence_bert_config.json``,
capped by the model's positions) go into the manifest, for the runtime's NumPy (``edgeroute.encoder``).

The export is validated as decoders are: the graph's pooled embeddings against PyTorch's on the built-in
sentences (the same tokenizer, the same pooling), refused below a cosine of :data:`MIN_COSINE`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgeroute.encoder import ENCODER_MANIFEST_VERSION, EncoderModel, pool
from edgeroute.errors import ExportError, ExportValidationError
from edgeroute.ner import scheme_of

from . import encoder_quality as quality
from .encoder_dropout import DROPOUT_INPUT, export_with_dropout
from .steps import Stages

MIN_COSINE = 0.9999
VALIDATION_TEXTS = [
    "The capital of France is Paris.",
    "A little robot learned to paint the sea and the sky.",
    "Bees carry pollen from flower to flower.",
    "short",
]
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}


# RoBERTa-style embeddings number positions from pad_token_id + 1 (transformers' create_position_ids_from_input_ids)
_POSITIONS_AFTER_PAD = {
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert",
    "longformer", "mpnet",
}  # fmt: skip


def max_positions(config: Any) -> int:
    """The most tokens the model's position embeddings take (RoBERTa-style: less pad_token_id + 1)."""
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    if config.model_type in _POSITIONS_AFTER_PAD:
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def is_sentence_transformers(folder: Path) -> bool:
    return folder.is_dir() and (folder / "modules.json").is_file()


def read_sentence_transformers(folder: Path) -> dict[str, Any]:
    """The pooling, normalisation and maximum length of a sentence-transformers folder (ExportError when the
    modules are not Transformer -> Pooling [-> Normalize])."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder / 'modules.json'} is not readable JSON: {e}") from None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    if not kinds or kinds[0] != "Transformer" or "Pooling" not in kinds:
        raise ExportError(f"{folder}: modules {kinds} are not a Transformer followed by a Pooling module")
    extra = [k for k in kinds[1:] if k not in ("Pooling", "Normalize")]
    if extra:
        raise ExportError(f"{folder}: the module {extra[0]} is not supported (Transformer, Pooling, Normalize)")
    if any(m.get("path") not in ("", None) for m in modules if str(m.get("type", "")).endswith("Transformer")):
        raise ExportError(f"{folder}: a Transformer module in a subfolder is not supported")
    pooling_path = next(folder / m["path"] for m in modules if str(m.get("type", "")).endswith("Pooling"))
    config = json.loads((pooling_path / "config.json").read_text(encoding="utf-8"))
    modes = [name for key, name in _POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise ExportError(f"{pooling_path / 'config.json'}: one pooling mode is supported, found {modes or 'none'}")
    st = folder / "sentence_bert_config.json"
    max_length = json.loads(st.read_text(encoding="utf-8")).get("max_seq_length") if st.is_file() else None
    return {"pooling": modes[0], "normalize": "Normalize" in kinds, "max_length": max_length}


def export_embedding(source: Path, stage: Path, validate: bool, stages: Stages, precision: Precision) -> None:
    """Export a sentence-transformers folder into the empty folder ``stage`` (fp32), validated against PyTorch
    (``export_model`` builds into a temporary folder and moves it into place). Steps: ``export``, ``validate``."""
    import torch
    import transformers

    settings = read_sentence_transformers(source)
    if not (source / "tokenizer.json").is_file():
        raise ExportError(f"{source} has no tokenizer.json (a fast tokenizer is needed)")
    config = transformers.AutoConfig.from_pretrained(source)
    positions = max_positions(config)
    max_length = min(int(settings["max_length"] or positions), positions)
    with stages("export"):
        _graph(source, stage, "feature-extraction")
    fields = {"pooling": settings["pooling"], "normalize": settings["normalize"]}
    manifest = _manifest(stage, source, config, "embedding", max_length, fields)
    if validate:
        with stages("validate") as step:
            step.total(len(VALIDATION_TEXTS))
            cosine = _validate(stage, source, torch, transformers)
            step.advance(len(VALIDATION_TEXTS))
        if cosine < MIN_COSINE:
            raise ExportValidationError(f"the exported embeddings' cosine with PyTorch is {cosine:.6f} < {MIN_COSINE}")
        manifest["provenance"]["validation"] = {"min_cosine": cosine, "texts": len(VALIDATION_TEXTS)}
        _write(stage, manifest)
    _precision(stage, manifest, precision, stages)


def _validate(folder: Path, source: Path, torch: Any, transformers: Any) -> float:
    """The smallest cosine between the export's embeddings and PyTorch's over the validation texts."""
    model = EncoderModel.load(folder)
    ours = model.embed(VALIDATION_TEXTS).vectors
    hf = transformers.AutoModel.from_pretrained(source).eval()
    ids, mask = model.tokenize(VALIDATION_TEXTS)
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    want = pool(hidden, mask, model.pooling, model.normalize)
    cos = (ours * want).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(want, axis=1))
    return float(cos.min())


# -- sequence classification ---------------------------------------------------------------------------------------
MAX_LOGIT_DIFF = 1e-3


def is_sequence_classifier(folder: Path, head: str = "ForSequenceClassification") -> bool:
    """A Hugging Face checkpoint folder of a ``*ForSequenceClassification`` (``head``) model (not a
    sentence-transformers one)."""
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file() or (folder / "modules.json").exists():
        return False
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(head) for a in archs)


def export_classifier(
    source: Path, stage: Path, validate: bool, stages: Stages, precision: Precision, tokens: bool = False
) -> None:
    """Export a ``*ForSequenceClassification`` checkpoint into ``stage`` (fp32): the graph gives the logits; the
    labels (``id2label`` in id order), the problem type (``problem_type``, else single-label: a one-label model's
    scores are then sigmoids, as transformers' pipeline scores them) and the maximum length go into the manifest;
    validated
    against PyTorch's logits (max |difference| and the same best label)."""
    import torch
    import transformers

    if not (source / "tokenizer.json").is_file():
        raise ExportError(f"{source} has no tokenizer.json (a fast tokenizer is needed)")
    config = transformers.AutoConfig.from_pretrained(source)
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    problem = config.problem_type or "single_label_classification"  # (one label and none said: sigmoid, at run time)
    positions = max_positions(config)
    tok_config = source / "tokenizer_config.json"
    limit = json.loads(tok_config.read_text(encoding="utf-8")).get("model_max_length") if tok_config.is_file() else None
    max_length = min(int(limit), positions) if isinstance(limit, int) and limit > 0 else positions
    with stages("export"):  # optimum's graph, with the fine-tune's dropout behind a switch (stochastic passes)
        task = "token-classification" if tokens else "text-classification"
        switched = export_with_dropout(source, stage / "model.onnx", task)
        shutil.copy(source / "tokenizer.json", stage / "tokenizer.json")
    dropout = {"dropout_input": DROPOUT_INPUT, "dropout_layers": switched}
    if tokens:  # a tag per token: the labels are the tag set
        fields = {"labels": labels, "scheme": scheme_of(labels), **dropout}
        manifest = _manifest(stage, source, config, "token-classification", max_length, fields)
    else:
        fields = {"labels": labels, "problem_type": problem, **dropout}
        manifest = _manifest(stage, source, config, "classification", max_length, fields)
    if validate:
        _validate_logits(stage, source, manifest, stages, tokens, torch, transformers)
    _precision(stage, manifest, precision, stages)


def _validate_logits(
    stage: Path, source: Path, manifest: dict[str, Any], stages: Stages, tokens: bool, torch: Any, transformers: Any
) -> None:
    """Every logit of the validation texts against PyTorch's: max |difference| and the same best labels."""
    with stages("validate") as step:
        step.total(len(VALIDATION_TEXTS))
        model = EncoderModel.load(stage)
        ids, mask = model.tokenize(VALIDATION_TEXTS)
        auto = (
            transformers.AutoModelForTokenClassification if tokens else transformers.AutoModelForSequenceClassification
        )
        hf = auto.from_pretrained(source).eval()
        with torch.no_grad():
            want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        if tokens:  # every real position's logits
            ours = model._run(ids, mask)[mask.astype(bool)]
            want = want[mask.astype(bool)]
        else:
            ours = model._scores(VALIDATION_TEXTS, "refuse", 2048, "none", "mean")[0]
        step.advance(len(VALIDATION_TEXTS))
    diff = float(np.abs(ours - want).max())
    same = bool((ours.argmax(-1) == want.argmax(-1)).all())
    if diff > MAX_LOGIT_DIFF or not same:
        raise ExportValidationError(
            f"the exported logits differ from PyTorch's by {diff:.2e} (limit {MAX_LOGIT_DIFF}); best labels"
            f" {'agree' if same else 'differ'}"
        )
    manifest["provenance"]["validation"] = {
        "max_abs_logit_diff": diff,
        "same_labels": same,
        "texts": len(VALIDATION_TEXTS),
    }
    _write(stage, manifest)


@dataclass(frozen=True)
class Precision:
    """An encoder export's precision: ``quantize`` ``"none"`` or ``"int8"`` (dynamic; ``per_channel`` weight
    scales), ``dtype`` ``"fp32"`` or ``"fp16"`` (for CUDA: the fp32 graph cast, inputs and outputs kept float32);
    anything but fp32 gated on ``quality_texts`` (None: the built-in set) unless ``force_quality``."""

    quantize: str = "none"
    dtype: str = "fp32"
    per_channel: bool = True
    quality_texts: list[str] | None = None
    force_quality: bool = False


def _precision(stage: Path, manifest: dict[str, Any], precision: Precision, stages: Stages) -> None:
    """The int8 (or fp16) graph in place of the fp32 one, measured against it and gated
    (``export/encoder_quality.py``)."""
    if precision.quantize == "none" and precision.dtype == "fp32":
        return
    from edgeroute.session import create_session
    from tokenizers import Tokenizer

    fp32 = stage / "fp32"
    fp32.mkdir()
    for produced in stage.glob("model.onnx*"):
        produced.rename(fp32 / produced.name)
    if precision.dtype == "fp16":
        with stages("fp16"):
            quality.cast_fp16(fp32 / "model.onnx", stage / "model.onnx")
        manifest["precision"] = "fp16"
    else:
        with stages("quantise"):
            quality.quantize_int8(fp32 / "model.onnx", stage / "model.onnx", precision.per_channel)
        manifest["precision"] = "int8"
        manifest["quantization"] = {"method": "int8-dynamic", "weights": "int8", "per_channel": precision.per_channel}
    texts = precision.quality_texts or quality.QUALITY_TEXTS
    _write(stage, manifest)
    with stages("quality") as step:
        step.total(len(texts))
        tokenizer = Tokenizer.from_file(str(stage / "tokenizer.json"))
        reference = EncoderModel(stage, manifest, create_session(fp32 / "model.onnx", "cpu", None), tokenizer)
        measured = quality.measure(reference, EncoderModel.load(stage), texts)
        step.advance(len(texts))
    shutil.rmtree(fp32)
    gated = quality.gate(manifest["task"], measured, precision.force_quality, manifest["precision"])
    manifest["provenance"]["quality"] = gated
    _write(stage, manifest)


def _write(stage: Path, manifest: dict[str, Any]) -> None:
    (stage / "edgeroute.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _graph(source: Path, stage: Path, task: str) -> None:
    """optimum's export of ``source`` for ``task`` into ``stage`` (the graph and any external data), with the
    tokenizer."""
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory(prefix="edgeroute-encoder-") as tmp:
        onnx_dir = Path(tmp) / "onnx"
        main_export(str(source), output=str(onnx_dir), task=task, library_name="transformers")
        for produced in onnx_dir.glob("model.onnx*"):
            shutil.copy(produced, stage / produced.name)
    shutil.copy(source / "tokenizer.json", stage / "tokenizer.json")


def _manifest(
    stage: Path, source: Path, config: Any, task: str, max_length: int, fields: dict[str, Any]
) -> dict[str, Any]:
    """Write (and return) an encoder manifest: the common fields, then the task's ``fields``; validation later."""
    manifest: dict[str, Any] = {
        "schema_version": ENCODER_MANIFEST_VERSION,
        "task": task,
        "graph": "model.onnx",
        "architecture": config.model_type,
        "hidden_size": int(config.hidden_size),
        "max_length": max_length,
        **fields,
        "precision": "fp32",
        "provenance": {"source": str(source), "validation": None},
    }
    _write(stage, manifest)
    return manifest
