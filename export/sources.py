"""Checkpoint sources: a Hugging Face checkpoint folder, a PEFT LoRA adapter folder, or a ``.gguf`` file.

Everything is local: the hub is switched off for the whole export, and a name that is not a local path gives a
clear error instead of a download.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeroute.errors import ExportError, first_line

from .steps import NO_STEP, Step

# Families tested end to end with tiny checkpoints (tests/test_export.py, tests/test_families.py) and SmolLM2.
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "qwen3", "gemma3_text", "smollm3", "gpt2")
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass
class Source:
    """A loaded checkpoint: the PyTorch model (fp32, eval), its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    kind: str  # "checkpoint" | "lora" | "gguf"
    description: str
    model_type: str


def offline() -> None:
    """Forbid any hub access for this process (transformers, huggingface_hub) and quiet the export stack's
    own progress bars and notices (edgeroute reports its stages itself)."""
    import logging

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("optimum", "optimum.exporters", "optimum.exporters.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


# optimum lists these for text-generation-with-past too, but they are encoder-decoder families
_ENCODER_DECODER = {"bart", "bigbird-pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "pegasus"}


def supported_model_types() -> list[str]:
    """Decoder-only model types optimum can export as ``text-generation-with-past``."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the TasksManager registry)
    from optimum.exporters.tasks import TasksManager

    types = TasksManager.get_supported_model_type_for_task("text-generation-with-past", exporter="onnx")
    return sorted({t.replace("_", "-") for t in types} - _ENCODER_DECODER)


def check_architecture(model_type: str) -> None:
    """Raise ``ExportError`` naming the model type and listing what is supported when optimum cannot export it."""
    supported = supported_model_types()
    if model_type.replace("_", "-") not in supported:
        raise ExportError(
            f"architecture {model_type!r} is not supported for export; supported: {', '.join(supported)}"
            f" (tested: {', '.join(TESTED_ARCHITECTURES)})"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is unreadable or not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object")
    return data


def resolve(source: str | Path) -> tuple[str, Path]:
    """Classify ``source`` as ``checkpoint``, ``lora`` or ``gguf`` (raises for anything else)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise ExportError(f"{path} is a file but not a .gguf file; pass a checkpoint folder or a .gguf file")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "lora", path
        if (path / "config.json").is_file():
            return "checkpoint", path
        raise ExportError(f"{path} has neither config.json (a checkpoint) nor adapter_config.json (a LoRA adapter)")
    hint = ""
    if "/" in str(source) and not str(source).startswith((".", "/", "~")) and str(source).count("/") == 1:
        hint = (
            " — it looks like a model hub id; edgeroute never downloads: fetch it first (for example"
            " `huggingface-cli download " + str(source) + " --local-dir DIR`) and pass the folder"
        )
    raise ExportError(f"{source} is not a local checkpoint folder or .gguf file{hint}")


def _load_checkpoint(path: Path, device: str) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _read_json(path / "config.json")
    model_type = str(config.get("model_type", "?"))
    check_architecture(model_type)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ExportError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[:2])}): incomplete checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:
        raise ExportError(f"cannot load the tokenizer from {path}: {first_line(e)}") from e
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{path}: no fast tokenizer (tokenizer.json) could be made for this checkpoint")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    except Exception as e:
        raise ExportError(f"cannot load the checkpoint {path}: {first_line(e)} (corrupt or incomplete?)") from e
    return model.to(device).eval(), tok, model_type


def load_source(
    source: str | Path,
    base: str | Path | None = None,
    device: str = "cpu",
    tokenizer: str | Path | None = None,
    step: Step = NO_STEP,
) -> Source:
    """Load ``source`` into a float32 PyTorch model and a fast tokenizer (``tokenizer``: a folder whose
    tokenizer.json replaces the source's own); ``step`` counts a GGUF file's tensors as they are read."""
    offline()
    src = _load(source, base, device, tokenizer is not None, step)
    if tokenizer is not None:
        src.tokenizer = load_tokenizer(tokenizer, src.model)
        src.description += f" (tokenizer: {Path(tokenizer).expanduser()})"
    return src


def _load(source: str | Path, base: str | Path | None, device: str, own_tokenizer: bool, step: Step) -> Source:
    kind, path = resolve(source)
    if kind == "checkpoint":
        model, tok, mt = _load_checkpoint(path, device)
        return Source(model, tok, kind, str(path), mt)
    if kind == "lora":
        adapter = _read_json(path / "adapter_config.json")
        base_ref = base if base is not None else adapter.get("base_model_name_or_path")
        if not base_ref:
            raise ExportError(f"{path}: the adapter names no base model; pass it with --base")
        base_path = Path(str(base_ref)).expanduser()
        if not base_path.is_dir():
            raise ExportError(
                f"LoRA adapter {path} needs its base model {base_ref}, which is not a local folder;"
                " pass the base checkpoint folder with --base"
            )
        model, tok, mt = _load_checkpoint(base_path, device)
        try:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        except ImportError as e:
            raise ExportError("LoRA export needs peft: pip install 'edgeroute[export]'") from e
        except Exception as e:
            raise ExportError(f"cannot apply the LoRA adapter {path} to {base_path}: {first_line(e)}") from e
        if (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        return Source(merged.eval(), tok, kind, f"{path} (LoRA) on {base_path}", mt)
    return _load_gguf(path, device, own_tokenizer, step)


@contextlib.contextmanager
def _gguf_tensors_counted(step: Step) -> Iterator[None]:
    """transformers reads a GGUF file's tensors under its own tqdm bar (``modeling_gguf_pytorch_utils.tqdm``, which
    ``disable_progress_bar`` does not reach): for the load, that loop reports to ``step`` instead and draws nothing.
    A transformers without that name keeps its bar."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    own = getattr(reader, "tqdm", None)
    if own is None:
        yield
        return

    def counted(items: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        if isinstance(items, Sized):
            step.total(len(items))
        for item in items:
            yield item
            step.advance()

    reader.tqdm = counted
    try:
        yield
    finally:
        reader.tqdm = own


def _load_gguf(path: Path, device: str, own_tokenizer: bool, step: Step = NO_STEP) -> Source:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ExportError("GGUF export needs gguf: pip install 'edgeroute[export]'") from e
    from . import gguf_tokenizer

    # the tokenizer as llama.cpp reads the file (transformers' GGUF conversion can disagree: Gemma's vocabulary
    # split words into fragments, add_bos_token ignored, special tokens mislabelled), unless --tokenizer gives one
    tok = None if own_tokenizer else gguf_tokenizer.load(path)[0]
    try:
        with _gguf_tensors_counted(step):
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
            )
    except Exception as e:
        raise ExportError(f"cannot load {path} through transformers' GGUF support: {first_line(e)}") from e
    check_architecture(model.config.model_type)
    return Source(model.to(device).eval(), tok, "gguf", str(path), model.config.model_type)


def check_tokenizer_dir(folder: str | Path) -> Path:
    """``--tokenizer DIR`` as a path, or ``ExportError`` when it holds no tokenizer.json."""
    path = Path(folder).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"--tokenizer {folder}: no tokenizer.json in that folder")
    return path


def load_tokenizer(folder: str | Path, model: Any) -> Any:
    """``--tokenizer DIR``: the fast tokenizer (and chat template) of the original checkpoint, checked against the
    model's vocabulary."""
    from transformers import AutoTokenizer

    path = check_tokenizer_dir(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:
        raise ExportError(f"--tokenizer {folder}: cannot load it: {first_line(e)}") from e
    rows = int(model.get_input_embeddings().weight.shape[0])
    top = max(tok.get_vocab().values(), default=-1)
    if top >= rows:
        raise ExportError(
            f"--tokenizer {folder}: its ids go up to {top} but the model has {rows} embedding rows: not this"
            " model's tokenizer"
        )
    return tok
