"""Write ``tests/data/gguf-vocab/*.json``: llama.cpp's token ids for each test GGUF (``tests/gguf_golden.py``).

    make golden            # installs the llamacpp extra (builds llama.cpp: minutes), then runs this

Each case's GGUF is built by ``tests/gguf_files.py`` and tokenized by llama-cpp-python (vocab only, ``special=True``,
with and without BOS); the file records the vocabulary's digest, which the tests check before comparing.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import llama_cpp  # noqa: E402  (pip install 'edgeroute[llamacpp]')
from checkpoints import make_checkpoint  # noqa: E402
from conftest import smollm2_gguf  # noqa: E402
from gguf_golden import GOLDEN, cases, vocab_digest  # noqa: E402


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (write, texts) in cases(
            smollm2_gguf, lambda d: make_checkpoint(d / "ckpt", "qwen3_head128", seed=3)
        ).items():
            folder = Path(tmp) / name
            folder.mkdir()
            gguf = write(folder)
            llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
            ids = [
                {"text": t, "add_bos": add, "ids": llm.tokenize(t.encode(), add_bos=add, special=True)}
                for t in texts
                for add in (True, False)
            ]
            data = {
                "case": name,
                "llama_cpp_python": llama_cpp.__version__,
                "vocab_sha256": vocab_digest(gguf),
                "ids": ids,
            }
            (GOLDEN / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
            print(f"{name}: {len(ids)} id lists")


if __name__ == "__main__":
    main()
