"""Write ``tokenizer.json`` and ``edgeroute.json`` for an exported graph."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from edgeroute._version import __version__
from edgeroute.contract import GraphContract
from edgeroute.errors import ExportError
from edgeroute.folder_io import update_json
from edgeroute.manifest import MANIFEST_NAME, Manifest, file_entries

# checkpoint generation_config keys -> SamplingConfig / GenerationConfig fields
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def generation_defaults(model: Any) -> dict[str, Any]:
    """The checkpoint's own generation settings (only those it set), in edgeroute's terms."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    diff = gc.to_diff_dict()
    out: dict[str, Any] = {}
    if diff.get("do_sample") is True:
        out.update({k: diff[k] for k in _SAMPLING_KEYS if diff.get(k) is not None})
    elif diff.get("do_sample") is False:
        out["temperature"] = 0.0
    if diff.get("max_new_tokens"):
        out["max_new_tokens"] = int(diff["max_new_tokens"])
    return out


def _versions() -> dict[str, str]:
    out = {"edgeroute": __version__, "python": platform.python_version()}
    for name in ("onnxruntime", "onnx", "torch", "transformers", "optimum"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            pass
    try:
        from importlib.metadata import version

        out["optimum-onnx"] = version("optimum-onnx")
    except Exception:
        pass
    return out


def context_of(config: Any, context_length: int | None) -> int:
    """The manifest's context length: the checkpoint's maximum positions, or the smaller ``context_length``."""
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not max_pos:
        raise ExportError("the checkpoint's config gives no maximum position count")
    return min(int(max_pos), context_length) if context_length else int(max_pos)


def write(
    folder: Path,
    src: Any,
    contract: GraphContract,
    backend_name: str,
    dtype: str,
    quant: dict[str, Any],
    context_length: int | None,
    times: dict[str, float],
) -> Manifest:
    tok = src.tokenizer
    backend = tok.backend_tokenizer
    backend.save(str(folder / "tokenizer.json"))
    config = src.model.config
    ctx = context_of(config, context_length)
    eos = _ids(getattr(src.model.generation_config, "eos_token_id", None)) + _ids(config.eos_token_id)
    if tok.eos_token_id is not None:
        eos.append(int(tok.eos_token_id))
    eos = sorted(set(eos))
    if not eos:
        raise ExportError("the checkpoint defines no end-of-sequence token")
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    vocab = contract.vocab_size or int(config.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else getattr(config, "pad_token_id", None)
    manifest = Manifest.from_dict(
        {
            "schema_version": 1,
            "graph": "model.onnx",
            **contract.to_fields(),
            "vocab_size": vocab,
            "context_length": ctx,
            "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id < vocab else None,
            "eos_token_ids": [i for i in eos if i < vocab],
            "pad_token_id": pad if isinstance(pad, int) and 0 <= pad < vocab else None,
            "special_tokens": special,
            "chat_template": template,
            "generation_defaults": generation_defaults(src.model),
            "precision": dtype,
            "quantization": quant,
            "provenance": {
                "source": src.description,
                "source_kind": src.kind,
                "model_type": src.model_type,
                "architecture": type(src.model).__name__,
                "backend": backend_name,
                "parameters": int(sum(p.numel() for p in src.model.parameters())),
                "versions": _versions(),
                "export_seconds": dict(times),
            },
            # every file of the folder but the manifest: sizes are checked at load, hashes by `edgeroute info`
            "files": file_entries(folder, [f.name for f in folder.iterdir() if f.name != MANIFEST_NAME]),
        }
    )
    manifest.save(folder)
    return manifest


def add_validation(folder: Path, report: dict[str, Any], times: dict[str, float]) -> None:
    def add(data: dict[str, Any]) -> None:
        data["provenance"]["validation"] = report
        data["provenance"]["export_seconds"] = dict(times)

    update_json(folder / MANIFEST_NAME, add, lock=False)  # the export's own temporary folder
