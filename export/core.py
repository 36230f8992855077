"""``export_model``: checkpoint -> verified edgeroute model folder, written atomically.

The folder is built in a hidden temporary folder beside ``out_dir`` and renamed into place only when complete.
A failure, Ctrl-C or SIGTERM removes the temporary folder and leaves no ``out_dir``; ``force`` replaces an
existing ``out_dir`` only after the new export succeeded. A SIGKILL cannot be cleaned up after: its hidden
temporary folder is removed by the next export into the same parent folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeroute.contract import GraphContract
from edgeroute.errors import ConfigError, ExportError, first_line
from edgeroute.manifest import MANIFEST_NAME

from .steps import Progress, Stages

DTYPES = ("fp32", "fp16")
QUANTIZE = ("none", "int8", "int4")
HEADS = ("int4", "int8")  # an LM head's precision, fewest bits first
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "fused", "optimum")
BLOCK_SIZES = (16, 32, 64, 128, 256)
TMP_PREFIX = ".edgeroute-export-"


def _require_stack() -> None:
    missing = []
    for mod in ("torch", "transformers", "optimum.exporters.onnx", "onnx"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod.split(".")[0])
    if missing:
        raise ExportError(
            f"the export needs {', '.join(missing)}, which is not installed: pip install 'edgeroute[export]'"
        )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while exporting so that cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _remove_stale_temps(parent: Path) -> None:
    """Remove hidden temporary folders of exports whose process no longer exists (killed with SIGKILL)."""
    for p in parent.glob(TMP_PREFIX + "*"):
        try:
            pid = int(p.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def export_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    quantize: str = "none",
    device: str = "cpu",
    validate: bool = True,
    force: bool = False,
    base: str | os.PathLike[str] | None = None,
    context_length: int | None = None,
    block_size: int = 32,
    backend: str = "auto",
    calibrate: bool = True,
    tokenizer: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    head: str | None = None,
    per_tensor: bool = False,
    quality_texts: str | os.PathLike[str] | None = None,
    force_quality: bool = False,
    lora_rank: int | None = None,
    lora_targets: Sequence[str] | None = None,
    loras: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Export a checkpoint to an edgeroute model folder and return its path.

    Args:
        source: a Hugging Face checkpoint folder, a PEFT LoRA adapter folder, or a ``.gguf`` file (local only);
            or an encoder: a sentence-transformers embedding folder (``modules.json``), a ``*ForSequenceClassification``
            or ``*ForTokenClassification`` checkpoint (``export/encoder.py``: fp32 or int8 on the CPU).
        out_dir: the model folder to create (refused if it exists, unless ``force``).
        dtype: ``fp32`` or ``fp16`` (fp16 is for CUDA; on CPU the fp32 export is cast after export). The fused
            backend also casts its int8 and int4 graphs (fp16 activations and scales: CUDA's MatMulNBits).
        quantize: ``none``, ``int8`` or ``int4``: block-wise weight quantisation of every MatMul weight
            (onnxruntime MatMulNBits, int8 activations at run time); see ``graph.quantize_weights``.
        device: ``cpu`` or ``cuda``: where PyTorch runs during export and validation, and the provider the graph is
            for: with ``cuda`` an fp16 export takes the fused backend under ``auto``, and the finished graph is
            loaded on the CUDA provider (no compute node may fall back to the CPU).
        validate: compare with PyTorch (fp32 parity raises ``ExportValidationError`` on failure).
        force: replace an existing ``out_dir`` (only once the new export succeeded).
        base: the base checkpoint folder of a LoRA adapter (default: the adapter's own reference).
        context_length: cap the manifest's context length (default: the model's maximum positions).
        block_size: quantisation block size (int8 and int4).
        backend: ``fused`` builds edgeroute's own graph (GroupQueryAttention with rotary inside, fused norms,
            packed projections, one shared in-place KV buffer; llama, mistral, qwen2, phi3, qwen3, gemma3_text,
            smollm3; fp32, int8, int4, and fp16 when asked: the fp32 graph cast, logits kept float32);
            ``optimum`` exports with optimum (every decoder optimum knows, fp16 included); ``auto`` (default)
            takes ``fused`` where it applies and ``optimum`` otherwise (and for fp16, until the fused fp16 graph is
            measured on a GPU), and records which in the manifest.
        calibrate: int4 only: weigh each weight's rounding error by its input channel's mean squared activation
            over edgeroute's built-in calibration text (``export/calibrate.py``); False quantises unweighted.
        tokenizer: a folder with the original checkpoint's ``tokenizer.json`` (and chat template) to ship instead
            of the source's own (a GGUF's tokenizer is rebuilt from its metadata as llama.cpp reads it).
        progress: called as ``progress(step, event, value)`` as the export goes: each step's ``"start"``, its
            ``"total"`` units of work where it knows them (GGUF tensors read, layers built, calibration chunks,
            weights quantised, texts validated), ``"advance"`` as they finish, and ``"done"`` with its seconds
            (``edgeroute.export.steps``).
        head: ``int8`` keeps the LM head (and a tied embedding, which reads the head's weights) at 8 bits in an int4
            export, as llama.cpp's Q4_K_M keeps its token embedding at Q8_0: for models whose large vocabulary
            makes the head a big share of the weights (Gemma 3); default (None or ``quantize``): as the layers.
        per_tensor: an encoder's int8 export: one weight scale per tensor (default: per output channel, which
            measured as fast and much closer to fp32: docs/encoders.md).
        quality_texts: an encoder's int8 export: a file of texts (one per line) the int8 model is measured on
            against fp32 (default: edgeroute's built-in set); below the gate's thresholds the export is refused
            (``QualityGateError``) unless ``force_quality`` (``export/encoder_quality.py``).
        lora_rank: a decoder graph (fused backend, fp32/int8/int4) that takes LoRA adapters at run time, per row,
            of at most this rank per module (docs/adapters.md); default: the largest rank of ``loras``, or none.
        lora_targets: the modules adapters may change (``q_proj`` ... ``down_proj``); default: those of ``loras``,
            or every linear module of the layers.
        loras: name -> PEFT LoRA folder (or edgeroute adapter file): adapters kept apart from the base, written into
            ``adapters/`` and listed by the manifest, each checked against PEFT in PyTorch (fp32: within the
            export's tolerance; int8/int4: top-1 agreement recorded). Add more later with ``edgeroute adapter add``.
    """
    for name, value, allowed in (
        ("dtype", dtype, DTYPES),
        ("quantize", quantize, QUANTIZE),
        ("device", device, DEVICES),
        ("backend", backend, BACKENDS),
    ):
        if value not in allowed:
            raise ConfigError(name, value, f"must be one of {', '.join(allowed)}")
    if dtype == "fp16" and quantize != "none" and backend == "optimum":
        raise ConfigError("quantize", quantize, "optimum's graphs are quantised from fp32: use dtype fp32 with it")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 1):
        raise ConfigError("context_length", context_length, "must be a positive integer")
    if head is not None:
        if head not in HEADS:
            raise ConfigError("head", head, f"must be one of {', '.join(HEADS)}")
        if quantize == "none":
            raise ConfigError("head", head, "sets the LM head's precision in a quantised export: add --quantize")
        if HEADS.index(head) < HEADS.index(quantize):
            raise ConfigError("head", head, f"the LM head cannot have fewer bits than the {quantize} layers")
    if block_size not in BLOCK_SIZES:
        raise ConfigError("block_size", block_size, f"must be one of {', '.join(map(str, BLOCK_SIZES))}")
    lora = _lora_options(lora_rank, lora_targets, loras, dtype, backend)
    out = Path(out_dir).expanduser().resolve()
    _check_target(out, [p for p in (source, base, tokenizer) if p is not None])
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"{out} is not an edgeroute model folder (it has no {MANIFEST_NAME}): --force only ever replaces one;"
            " choose an OUT_DIR that does not exist"
        )
    _require_stack()
    from . import encoder, sources

    embedding = encoder.is_sentence_transformers(Path(source).expanduser())
    classifier = not embedding and encoder.is_sequence_classifier(Path(source).expanduser())
    tagger = not embedding and encoder.is_sequence_classifier(Path(source).expanduser(), "ForTokenClassification")
    # an encoder: fp32 or int8 (dynamic, gated); the options of decoder exports do not apply
    if embedding or classifier or tagger:
        given = {
            "dtype": dtype == "fp16" and quantize != "none",
            "quantize": quantize == "int4",
            "base": base is not None,
        }
        given |= {"context_length": context_length is not None, "tokenizer": tokenizer is not None}
        given |= {"head": head is not None, "backend": backend != "auto", "device": device != "cpu"}
        given |= {"block_size": block_size != 32, "calibrate": not calibrate, "lora_rank": lora is not None}
        for name, on in given.items():
            if on:
                reason = "is not available for encoder exports (fp32, int8 dynamic quantisation or fp16; on the CPU)"
                raise ConfigError(name, locals()[name], reason)
        if quantize == "none" and per_tensor:
            raise ConfigError("per_tensor", per_tensor, "sets int8 weight scales: add --quantize int8")
        if quantize == "none" and dtype == "fp32" and (quality_texts is not None or force_quality):
            raise ConfigError("quantize", quantize, "--quality-texts and --force-quality are for int8 and fp16")
        from . import encoder_quality

        gated = quantize == "int8" or dtype == "fp16"
        texts = (
            encoder_quality.read_quality_texts(os.fspath(quality_texts) if quality_texts else None) if gated else None
        )
        precision = encoder.Precision(quantize, dtype, not per_tensor, texts, force_quality)
    else:
        for name, option in (
            ("per_tensor", per_tensor),
            ("quality_texts", quality_texts),
            ("force_quality", force_quality),
        ):
            if option:
                raise ConfigError(name, option, "is an option of encoder int8 exports (decoders: --block-size, --head)")
        sources.resolve(os.fspath(source))  # fail fast on a bad source, before anything heavy
    if tokenizer is not None:
        sources.check_tokenizer_dir(os.fspath(tokenizer))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ExportError("device 'cuda' asked for but PyTorch sees no CUDA device")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-{os.getpid()}-", dir=out.parent))
    stages = Stages(progress)
    try:
        with _terminate_as_interrupt():
            if embedding:
                encoder.export_embedding(Path(source).expanduser(), tmp, validate, stages, precision)
            elif classifier or tagger:
                encoder.export_classifier(Path(source).expanduser(), tmp, validate, stages, precision, tokens=tagger)
            else:
                options = (dtype, quantize, validate, context_length, block_size, backend, calibrate, head)
                _build(tmp, source, (base, tokenizer), device, options, stages, lora)
            _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _lora_options(
    rank: int | None, targets: Sequence[str] | None, loras: Mapping[str, Any] | None, dtype: str, backend: str
) -> tuple[int | None, Sequence[str] | None, dict[str, Any]] | None:
    """The export's adapter options checked (None: a graph without adapter inputs)."""
    if rank is None and targets is None and not loras:
        return None
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 256):
        raise ConfigError("lora_rank", rank, "must be an integer in [1, 256]")
    if targets is not None and (
        isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets)
    ):
        raise ConfigError("lora_targets", targets, "must be a list of module names (q_proj, ..., down_proj)")
    if dtype != "fp32":
        raise ConfigError("dtype", dtype, "adapters at run time need an fp32 graph (fp32, int8 or int4 weights)")
    if backend == "optimum":
        raise ConfigError("backend", backend, "adapters at run time need the fused backend")
    from edgeroute.adapters import check_file_name

    for name in loras or {}:
        check_file_name(name, "lora")
    if rank is None and not loras:
        raise ConfigError("lora_targets", targets, "needs --lora-rank (or adapters to take the rank from)")
    return rank, targets, dict(loras or {})


def _check_target(out: Path, sources: list[Any]) -> None:
    """Refuse an ``out`` that is a source (checkpoint, GGUF file, LoRA base) or a folder holding one: writing the
    export there, or replacing it with ``--force``, would destroy the source (symlinks resolved)."""
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            continue  # a hub id or a missing path: the source check says so
        path = path.resolve()
        if path == out or path.is_relative_to(out):
            raise ExportError(
                f"OUT_DIR {out} {'is' if path == out else 'holds'} the source {path}: the export would replace it;"
                " choose another OUT_DIR"
            )


def _finalise_modes(folder: Path) -> None:
    """mkdtemp makes the folder private (0700): give the result the modes the user's umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    _finalise_modes(tmp)
    if out.exists():
        if not force:
            raise ExportError(f"{out} appeared during the export; not replacing it")
        old = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}-old"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _build(
    tmp: Path,
    source: Any,
    companions: tuple[Any, Any],
    device: str,
    options: tuple[str, str, bool, int | None, int, str, bool, str | None],
    stages: Stages,
    lora: tuple[int | None, Sequence[str] | None, dict[str, Any]] | None = None,
) -> None:
    from . import adapters, fused, graph, manifest_writer, sources

    dtype, quantize, validate, context_length, block_size, backend, calibrate, head = options
    with stages("load") as step:
        src = sources.load_source(source, companions[0], device, tokenizer=companions[1], step=step)
    why_not = fused.unsupported_reason(src.model)
    if backend == "fused" and why_not:
        raise ExportError(f"the fused backend does not support {why_not}; use --backend optimum")
    # fp16 for CUDA (GroupQueryAttention has no fp32 CUDA kernel) and fp32 take the fused graph; fp16 for the CPU
    # provider keeps optimum's under auto until the fused fp16 graph is measured against it on a GPU
    fused_dtype = dtype == "fp32" or device == "cuda"
    use_fused = backend == "fused" or (backend == "auto" and why_not is None and fused_dtype)
    if lora is not None and not use_fused:
        raise ExportError(f"adapters at run time need the fused backend, which does not support {why_not}")
    if lora is not None and src.kind == "lora":
        raise ExportError("SOURCE is a LoRA adapter (it would be merged): give the base checkpoint and --lora NAME=DIR")
    read = adapters.read_all(lora[2]) if lora is not None else {}
    if dtype == "fp16" and quantize != "none" and not use_fused:
        raise ExportError(f"an fp16 {quantize} export needs the fused backend, which does not support {why_not}")
    final = tmp / "model.onnx"
    cast = use_fused and dtype == "fp16"  # the fused builder writes fp32; optimum's export casts by itself
    target = final if quantize == "none" and not cast else tmp / "fp32.onnx"
    quantized = final if not cast else tmp / "quantised.onnx"  # a quantised fp16 graph: quantise, then cast
    ctx = manifest_writer.context_of(src.model.config, context_length)
    if use_fused:
        with stages("export") as step:
            layout = adapters.choose_layout(src.model, lora[0], lora[1], read) if lora is not None else None
            contract = fused.build_fused(src.model, target, ctx, step, lora=layout)
    else:
        contract = _optimum_export(tmp, src, device, dtype, target, stages)
    quant: dict[str, Any] = {"method": "none"}
    if quantize != "none":  # steps "calibrate" (int4) and "quantise"
        fp32 = tmp / "fp32.onnx"
        calibration = None
        if quantize == "int4" and calibrate:
            from .calibrate import CALIBRATION_TEXT

            calibration = (list(src.tokenizer.encode(CALIBRATION_TEXT)), ctx, contract)
        bits = 8 if quantize == "int8" else 4
        head_bits = 8 if head == "int8" else bits
        quant = graph.quantize_weights(
            fp32, quantized, bits=bits, block_size=block_size, calibration=calibration, head_bits=head_bits,
            stages=stages,
        )  # fmt: skip
        _drop(tmp)
    if cast:  # the fused graph cast: weights (quantisation scales too), activations and KV fp16, logits float32
        with stages("fp16"):
            source_graph = target if quantize == "none" else quantized
            graph.save(graph.to_fp16(graph.load(source_graph)), final)
            _drop(tmp, source_graph.name)
        contract = dataclasses.replace(contract, kv_dtype="float16")
    if device == "cuda":
        with stages("cuda check"):
            check_on_cuda(final)
    backend_name = "fused" if use_fused else "optimum"
    manifest_writer.write(tmp, src, contract, backend_name, dtype, quant, context_length, stages.times)
    if validate:
        with stages("validate") as step:
            from .validate import validate as run_validation

            report = run_validation(tmp, src.model, dtype, quantize != "none", step=step)
        manifest_writer.add_validation(tmp, report, stages.times)
    if lora is not None and lora[2]:
        with stages("adapters"):
            adapters.add_all(tmp, lora[2], src.model, src.tokenizer, quantize != "none", validate)


def check_on_cuda(graph_path: Path) -> None:
    """Load ``graph_path`` on the CUDA provider: an ``ExportError`` when the provider is missing or a compute node of
    the graph would fall back to the CPU (``edgeroute.session.check_placement``)."""
    from edgeroute.errors import ModelLoadError
    from edgeroute.session import create_session

    try:
        create_session(graph_path, "cuda", threads=1)
    except ModelLoadError as e:
        raise ExportError(f"the exported graph does not run on CUDA: {e}") from None


def _drop(tmp: Path, name: str = "fp32.onnx") -> None:
    """Remove an intermediate graph (and its data file) a cast or a quantisation was made from."""
    for f in tmp.iterdir():
        if f.name.startswith(name):
            f.unlink()


def _optimum_export(tmp: Path, src: Any, device: str, dtype: str, target: Path, stages: Stages) -> GraphContract:
    """optimum's export, post-processed: last-positions logits, fp16 if asked; returns the graph's contract."""
    import warnings

    from . import graph

    raw = tmp / "raw"
    with stages("export"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optimum.exporters.onnx import onnx_export_from_model

        try:
            onnx_export_from_model(src.model, raw, task="text-generation-with-past", do_validation=False, device=device)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"optimum could not export {src.model_type}: {first_line(e)}") from e
    with stages("post-process"):
        proto = graph.load(raw / "model.onnx")
        proto = graph.add_logits_to_keep(proto)
        if dtype == "fp16":
            proto = graph.to_fp16(proto)
        graph.save(proto, target)
        contract = graph.describe(proto)
        del proto
        shutil.rmtree(raw)
    return contract
