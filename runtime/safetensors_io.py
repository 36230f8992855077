"""The safetensors format read and written with NumPy alone (the runtime's light core has no ``safetensors``
package): an 8-byte little-endian header length, a JSON header (each tensor's ``dtype``, ``shape`` and
``data_offsets`` into the data that follows, plus an optional ``__metadata__`` of strings), then the bytes.

Every header field is checked before a byte of data is trusted, so a cut or corrupt file is a :class:`ValueError`
naming what is wrong, never a crash or a huge allocation. ``tests/test_adapters.py`` checks both directions against
the ``safetensors`` package.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

MAX_HEADER = 100 << 20  # bytes of JSON header at most (safetensors' own bound)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a safetensors file as float32 arrays (bf16 and fp16 widened), and its metadata. Raises
    ``ValueError`` (what is wrong) or ``OSError`` (cannot read)."""
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            n = int.from_bytes(data[:8], "little")
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            try:
                header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"the header is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise ValueError("__metadata__ must map names to strings")
            start, tensors = 8 + n, {}
            for name, info in header.items():
                tensors[name] = _tensor(data, start, size, name, info)
    return tensors, meta


def _tensor(data: mmap.mmap, start: int, size: int, name: str, info: object) -> np.ndarray:
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: its entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} (read: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if not 0 <= begin <= end or end - begin != want or start + end > size:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not hold {shape} {dtype} inside the file")
    raw = np.frombuffer(data, dtype=_DTYPES[dtype], count=want // _DTYPES[dtype].itemsize, offset=start + begin)
    if dtype == "BF16":  # the high half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.astype(np.float32).reshape(shape)  # a copy: nothing keeps the map


def write(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write float32 ``tensors`` and string ``metadata`` as a safetensors file at ``path``."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for arr in blobs:
            f.write(arr.tobytes())
