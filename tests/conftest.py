from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import write_tiny_model  # noqa: E402

import edgeroute as er  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model folder (position_ids, fp32 KV, logits for every position)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> er.Model:
    return er.Model.load(tiny_dir, threads=1)


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory: pytest.TempPathFactory):
    """Build a tiny model folder with other graph options (cached per option set)."""
    cache: dict[tuple, Path] = {}

    def build(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = write_tiny_model(tmp_path_factory.mktemp("variant") / "model", **kw)
        return cache[key]

    return build


GREEDY = er.GenerationConfig(max_new_tokens=24, sampling=er.SamplingConfig(temperature=0))
