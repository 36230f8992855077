"""The model folder contract: ``edgeroute.json`` (schema version 1), read into a frozen :class:`Manifest`.

The manifest is all the runtime needs: graph file, logical-to-graph names, KV geometry, vocabulary, context
length, special ids, chat template, generation defaults, precision and provenance. No ``model_type`` switch
anywhere: the names come from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import GenerationConfig, SamplingConfig, is_number
from .contract import (
    DEFAULT_INPUTS,
    DEFAULT_OUTPUTS,
    KV_DTYPES,
    KV_LAYOUTS,
    LAYER,
    LOGITS_FORMS,
    SHARED_INPUTS,
    GraphContract,
    Name,
)
from .errors import ConfigError, ManifestError, ModelLoadError

MANIFEST_NAME = "edgeroute.json"
SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16")
QUANT_METHODS = ("none", "int8", "int4")


@dataclass(frozen=True)
class Manifest:
    """A parsed ``edgeroute.json``. Build one with :meth:`load` or :meth:`from_dict`.

    Args:
        graph: the ONNX file name inside the folder.
        inputs: logical name -> graph input name; ``position_ids`` may be None (the graph derives positions).
            ``past_key``/``past_value`` are patterns with ``{layer}``.
        outputs: logical name -> graph output name; ``present_key``/``present_value`` are patterns.
        logits: ``"all"`` (one row per input position), ``"last"`` (only the last position) or ``"keep"`` (the
            graph takes an int64 input ``inputs["logits_to_keep"]`` and returns that many last positions).
        num_layers, num_kv_heads, head_size: the KV geometry, ``[batch, num_kv_heads, length, head_size]``.
        kv_dtype: ``float32`` or ``float16``.
        kv_layout: ``"concat"``: the graph takes the past (``length`` positions, an attention mask and optional
            position ids) and returns the present (``length + n`` positions). ``"shared"``: past and present are
            one buffer per layer of the runtime's context cap, bound to both the input and the output and
            written in place; the graph takes int32 ``inputs["seqlens_k"]`` (each row's total length - 1) and
            an int32 scalar ``inputs["total_sequence_length"]`` instead of a mask (onnxruntime's
            GroupQueryAttention contract), and ``logits`` must be ``"keep"``.
        vocab_size: the logits' last dimension.
        context_length: the most tokens a sequence may hold (prompt + generated).
        bos_token_id, eos_token_ids, pad_token_id: special ids; every EOS id ends generation.
        special_tokens: token strings for the chat template (``bos_token``, ``eos_token``, ...).
        chat_template: a Jinja chat template, or None.
        generation_defaults: the checkpoint's defaults (``temperature``, ``top_p``, ``max_new_tokens``, ...).
        precision: ``fp32``/``fp16``; quantization: ``{"method": "none"|"int8"|"int4", ...}``.
        provenance: where it came from and the export's parity figures (free-form, but the fields ``edgeroute
            info`` reads are checked: ``parameters``, ``validation.max_abs_logit_diff``, ``validation.quality``...).
        files: file name -> ``{"bytes": n, "sha256": hex}`` for every file of the model (graph, external weights,
            tokenizer) as exported; ``Model.load`` compares the sizes, ``edgeroute info`` the hashes. Empty for
            folders exported before edgeroute recorded them.
        lora: a graph that takes LoRA adapters per row (``export --lora-rank``): ``rank`` (the most each adapter
            module may have), ``targets`` (the modules adapters may change) and ``projections`` (each packed
            projection's ``in``/``out`` widths and ``subs``: ``[module, output offset, width]``); None otherwise
            (``edgeroute.adapters``).
        adapters: name -> ``{"file": "adapters/NAME.safetensors", "bytes", "sha256", "rank", "alpha", "source"}``:
            the adapters that come with the folder (``edgeroute adapter add``), loaded with the model.
    """

    graph: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    inputs: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_INPUTS))
    outputs: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_OUTPUTS))
    logits: str = "all"
    kv_dtype: str = "float32"
    kv_layout: str = "concat"
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    generation_defaults: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    quantization: Mapping[str, Any] = field(default_factory=lambda: {"method": "none"})
    provenance: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lora: Mapping[str, Any] | None = None
    adapters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- the graph contract ----------------------------------------------------------------------------------
    @cached_property
    def contract(self) -> GraphContract:
        """The graph's inputs, outputs, logits form, KV layout and geometry (``contract.py``)."""
        return GraphContract.from_fields(self.__dict__)

    def past_names(self) -> list[tuple[str, str]]:
        """Graph input names ``(key, value)`` for every layer."""
        return self.contract.past_names()

    def present_names(self) -> list[tuple[str, str]]:
        """Graph output names ``(key, value)`` for every layer."""
        return self.contract.present_names()

    # -- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        for k in ("inputs", "outputs", "special_tokens", "generation_defaults", "quantization", "provenance", "files"):
            d[k] = dict(getattr(self, k))
        d["adapters"] = {k: dict(v) for k, v in self.adapters.items()}
        for k in ("lora", "adapters"):  # absent from folders without adapters, as before them
            if not d[k]:
                del d[k]
        return {"schema_version": d.pop("schema_version"), **d}

    def save(self, folder: str | Path) -> Path:
        """Write ``edgeroute.json`` into ``folder``."""
        from .folder_io import atomic_write

        path = Path(folder) / MANIFEST_NAME
        atomic_write(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read and validate ``folder/edgeroute.json``."""
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).is_dir():
            raise ModelLoadError(f"model folder not found: {folder}")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: not an edgeroute model folder (run `edgeroute export`)")
        if not path.resolve().is_relative_to(Path(folder).resolve()):
            raise ModelLoadError(f"{path} resolves outside the model folder (to {path.resolve()}): refusing to open it")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed manifest; raises :class:`ManifestError` naming the bad field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported (this edgeroute reads {SCHEMA_VERSION});"
                " re-export the model with this version of edgeroute"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"{source}: unknown field(s) {', '.join(unknown)}")

        def bad(name: str, why: str) -> ManifestError:
            return ManifestError(f"{source}: field {name!r} {why} (got {data.get(name)!r})")

        for name in (
            "graph",
            "num_layers",
            "num_kv_heads",
            "head_size",
            "vocab_size",
            "context_length",
            "eos_token_ids",
        ):
            if name not in data:
                raise ManifestError(f"{source}: required field {name!r} is missing")
        if not isinstance(data["graph"], str) or not data["graph"] or "/" in data["graph"].replace("\\", "/"):
            raise bad("graph", "must be a file name inside the model folder")
        for name in ("num_layers", "num_kv_heads", "head_size", "vocab_size", "context_length"):
            if not _pos_int(data[name]):
                raise bad(name, "must be a positive integer")
        eos = data["eos_token_ids"]
        if isinstance(eos, int) and not isinstance(eos, bool):
            eos = [eos]
        if not isinstance(eos, list) or not eos or not all(_id_ok(i, data["vocab_size"]) for i in eos):
            raise bad("eos_token_ids", "must be a non-empty list of token ids below vocab_size")
        for name in ("bos_token_id", "pad_token_id"):
            if data.get(name) is not None and not _id_ok(data[name], data["vocab_size"]):
                raise bad(name, "must be a token id below vocab_size or null")
        nullable = {Name.POSITION_IDS, Name.ATTENTION_MASK, *SHARED_INPUTS, Name.QUERY_SEQLENS}
        inputs = {**DEFAULT_INPUTS, **_str_map(data, "inputs", source, allow_null=nullable)}
        outputs = {**DEFAULT_OUTPUTS, **_str_map(data, "outputs", source)}
        layout = data.get("kv_layout", "concat")
        if layout not in KV_LAYOUTS:
            raise bad("kv_layout", f"must be one of {', '.join(KV_LAYOUTS)}")
        needed: tuple[str, ...] = (Name.INPUT_IDS, Name.PAST_KEY, Name.PAST_VALUE)
        needed += SHARED_INPUTS if layout == "shared" else (Name.ATTENTION_MASK,)
        for key in needed:
            if not inputs.get(key):
                raise bad("inputs", f"needs a name for {key!r} (kv_layout {layout!r})")
        if layout == "shared" and data.get("logits") != "keep":
            raise bad("logits", "must be 'keep' with kv_layout 'shared'")
        for pat, where in (
            (inputs["past_key"], "inputs.past_key"),
            (inputs["past_value"], "inputs.past_value"),
            (outputs["present_key"], "outputs.present_key"),
            (outputs["present_value"], "outputs.present_value"),
        ):
            if LAYER not in str(pat):
                raise ManifestError(f"{source}: {where} must contain {LAYER} (got {pat!r})")
        if data.get("logits", "all") not in LOGITS_FORMS:
            raise bad("logits", f"must be one of {', '.join(LOGITS_FORMS)}")
        if data.get("logits") == "keep" and not inputs.get(Name.LOGITS_TO_KEEP):
            raise bad("logits", "is 'keep' but inputs has no 'logits_to_keep' name")
        if data.get("kv_dtype", "float32") not in KV_DTYPES:
            raise bad("kv_dtype", f"must be one of {', '.join(KV_DTYPES)}")
        if data.get("chat_template") is not None and not isinstance(data["chat_template"], str):
            raise bad("chat_template", "must be a string or null")
        for name in ("special_tokens", "generation_defaults", "quantization", "provenance", "files"):
            if name in data and not isinstance(data[name], dict):
                raise bad(name, "must be an object")
        if not all(isinstance(v, str) for v in data.get("special_tokens", {}).values()):
            raise bad("special_tokens", "must map names to token strings")
        if data.get("precision", "fp32") not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        _check_quantization(data.get("quantization", {"method": "none"}), source)
        _check_generation_defaults(data.get("generation_defaults", {}), source)
        _check_provenance(data.get("provenance", {}), source)
        _check_files(data.get("files", {}), source)
        if data.get("lora") is not None:
            _check_lora(data["lora"], layout, source)
        _check_adapters(data.get("adapters", {}), data.get("lora"), source)
        kwargs = dict(data)
        kwargs.update(eos_token_ids=tuple(int(i) for i in eos), inputs=inputs, outputs=outputs)
        return cls(**kwargs)


def _check_quantization(q: Any, source: str) -> None:
    if q.get("method") not in QUANT_METHODS:
        raise ManifestError(
            f"{source}: field 'quantization.method' must be one of {', '.join(QUANT_METHODS)} (got {q.get('method')!r})"
        )
    if "block_size" in q and not _pos_int(q["block_size"]):
        raise ManifestError(
            f"{source}: field 'quantization.block_size' must be a positive integer (got {q['block_size']!r})"
        )


def _check_generation_defaults(defaults: dict[str, Any], source: str) -> None:
    """The checkpoint's defaults must make valid configs: a bad one is the folder's fault, named as such (not as if
    it were a flag the user gave)."""
    sampling_keys = set(SamplingConfig.__dataclass_fields__) - {"logit_bias", "seed"}
    generation_keys = {"max_new_tokens", "min_new_tokens", "stop"}
    unknown = sorted(set(defaults) - sampling_keys - generation_keys)
    if unknown:
        raise ManifestError(f"{source}: field 'generation_defaults' has unknown key(s) {', '.join(unknown)}")
    try:
        SamplingConfig(**{k: v for k, v in defaults.items() if k in sampling_keys})
        GenerationConfig(**{k: v for k, v in defaults.items() if k in generation_keys})
    except ConfigError as e:
        raise ManifestError(f"{source}: field 'generation_defaults.{e.field}' {e.reason} (got {e.value!r})") from None


# provenance fields that edgeroute reads (``info``, ``bench``): name -> (check, what it must be)
_PROVENANCE: dict[str, tuple[Any, str]] = {
    "parameters": (lambda v: v is None or _pos_int(v), "a positive integer or null"),
    "architecture": (lambda v: isinstance(v, str), "a string"),
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "backend": (lambda v: v in ("fused", "optimum"), "'fused' or 'optimum'"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "validation": (lambda v: isinstance(v, dict), "an object"),
    "validation.max_abs_logit_diff": (is_number, "a number"),
    "validation.greedy_identical": (lambda v: isinstance(v, bool), "true or false"),
    "validation.greedy_tokens": (lambda v: _pos_int(v), "a positive integer"),
    "validation.quality": (lambda v: isinstance(v, dict), "an object"),
    **{
        f"validation.quality.{k}": (is_number, "a number")
        for k in ("top1_agreement", "perplexity", "perplexity_reference", "perplexity_change_pct", "tokens")
    },
    "validation.quality.reference_top1": (
        lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
        "a list of token ids",
    ),
}


def _check_provenance(prov: dict[str, Any], source: str) -> None:
    for name, (ok, what) in _PROVENANCE.items():
        node: Any = prov
        for part in name.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and not ok(node):
            raise ManifestError(f"{source}: field 'provenance.{name}' must be {what} (got {node!r})")


def _check_files(files: dict[str, Any], source: str) -> None:
    for name, entry in files.items():
        ok = (
            isinstance(name, str)
            and name
            and "/" not in name.replace("\\", "/")
            and name not in (".", "..")
            and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        )
        if not ok:
            raise ManifestError(
                f"{source}: field 'files' must map file names in the folder to {{bytes, sha256}} (got {name!r}:"
                f" {entry!r})"
            )


def _check_lora(lora: Any, layout: str, source: str) -> None:
    def bad(why: str) -> ManifestError:
        return ManifestError(f"{source}: field 'lora' {why} (got {lora!r})"[:400])

    if layout != "shared":
        raise bad("needs kv_layout 'shared' (a fused graph)")
    if not isinstance(lora, dict) or not _pos_int(lora.get("rank")):
        raise bad("must be an object with a positive integer 'rank'")
    targets, projections = lora.get("targets"), lora.get("projections")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise bad("needs 'targets', a non-empty list of module names")
    if not isinstance(projections, dict) or not projections:
        raise bad("needs 'projections', an object")
    named = []
    for proj in projections.values():
        subs = proj.get("subs") if isinstance(proj, dict) else None
        if not (isinstance(proj, dict) and _pos_int(proj.get("in")) and _pos_int(proj.get("out"))):
            raise bad("projections need positive integer 'in' and 'out'")
        if not isinstance(subs, list) or not subs:
            raise bad("projections need 'subs'")
        for sub in subs:
            ok = isinstance(sub, list) and len(sub) == 3 and isinstance(sub[0], str)
            if not (ok and _int_ge0(sub[1]) and _pos_int(sub[2]) and sub[1] + sub[2] <= proj["out"]):
                raise bad("subs must be [module, offset, width] inside the projection's output")
            named.append(sub[0])
    if sorted(named) != sorted(targets):
        raise bad("targets must be the modules of the projections' subs")


def _check_adapters(adapters: Any, lora: Any, source: str) -> None:
    if not isinstance(adapters, dict):
        raise ManifestError(f"{source}: field 'adapters' must be an object (got {adapters!r})")
    if adapters and lora is None:
        raise ManifestError(f"{source}: field 'adapters' needs a LoRA graph (field 'lora')")
    for name, entry in adapters.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        ok = (
            isinstance(file, str)
            and file.startswith("adapters/")
            and "/" not in file[len("adapters/") :]
            and file[len("adapters/") :] not in ("", ".", "..")
            and _int_ge0(entry.get("bytes"))
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        )
        if not ok:
            raise ManifestError(
                f"{source}: field 'adapters' must map names to {{file: adapters/NAME.safetensors, bytes, sha256, ...}}"
                f" (got {name!r}: {entry!r})"[:400]
            )


_ABSENT = object()


def _int_ge0(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _id_ok(v: Any, vocab: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab


def _str_map(data: dict[str, Any], name: str, source: str, allow_null: set[str] = set()) -> dict[str, Any]:  # noqa: B006
    m = data.get(name, {})
    if not isinstance(m, dict) or not all(
        isinstance(v, str) and v or (v is None and k in allow_null) for k, v in m.items()
    ):
        raise ManifestError(f"{source}: field {name!r} must map names to graph names (got {m!r})")
    return m


def model_files(folder: str | Path, manifest: Manifest) -> list[Path]:
    """The files of a model folder that edgeroute reads: the manifest, the tokenizer, the graph and its external
    weights (files named after the graph), and every file the manifest records."""
    root = Path(folder)
    names = {MANIFEST_NAME, "tokenizer.json", manifest.graph, *manifest.files}
    names.update(str(a["file"]) for a in manifest.adapters.values())
    if root.is_dir():
        names.update(p.name for p in root.iterdir() if p.name.startswith(manifest.graph))
    return [root / n for n in sorted(names)]


def check_files(folder: str | Path, manifest: Manifest, hashes: bool = False) -> None:
    """Raise ``ModelLoadError`` naming the file when a file of the folder resolves outside it (a symlink out),
    the graph or the tokenizer is missing, or a file differs from what the export recorded: its size (cheap,
    checked at every load) and, with ``hashes``, its SHA-256 (``edgeroute info``)."""
    root = Path(folder).resolve()
    for path in model_files(folder, manifest):
        if path.is_symlink() or path.exists():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise ModelLoadError(f"{path} resolves outside the model folder (to {target}): refusing to open it")
    for name, missing in (
        (manifest.graph, "graph file {} named by the manifest is missing"),
        ("tokenizer.json", "{} is missing"),
    ):
        if not (Path(folder) / name).is_file():
            raise ModelLoadError(missing.format(Path(folder) / name))
    recorded = {**manifest.files, **{str(a["file"]): a for a in manifest.adapters.values()}}
    for name, entry in recorded.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (the export wrote it): the folder is incomplete, re-export it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ModelLoadError(
                f"{path} is {size} bytes but was exported as {entry['bytes']}: the file was changed or cut short"
            )
        if hashes:
            if sha256_of(path) != entry["sha256"]:
                raise ModelLoadError(f"{path} does not match the SHA-256 the export recorded: the file was changed")


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``files`` entries (size and SHA-256) for the named files of ``folder``."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_of(folder / n)} for n in sorted(names)}
