"""Zero arrays whose memory is committed page by page as it is first written: one anonymous memory map holding
several arrays (``np.zeros`` does not guarantee that: once a freed buffer raised malloc's mmap threshold, the next
one came from the heap and was zeroed in full). The KV buffers (``kv_cache``) and a LoRA graph's per-row adapter
weights (``adapters``) live in such maps, so positions and rows never used cost no memory."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np


def lazy_arrays(
    shapes: list[tuple[int, ...]], dtype: np.dtype, refuse: Callable[[int, str], Exception]
) -> list[np.ndarray]:
    """Zero arrays of ``shapes`` in one anonymous memory map. When the system will not reserve it, raises
    ``refuse(bytes, why)`` (the caller's error, naming its setting)."""
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes) * dtype.itemsize
    try:
        region = mmap.mmap(-1, max(total, 1))
    except (OSError, OverflowError, MemoryError, ValueError) as e:
        raise refuse(
            total, e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        ) from None
    out, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(np.frombuffer(region, dtype=dtype, count=size, offset=offset * dtype.itemsize).reshape(shape))
        offset += size
    return out
