"""GGUF tokenizers as llama.cpp reads them: the ids of the exported tokenizer.json against llama.cpp's own ids for
the same file (SmolLM2's byte-level BPE GGUF, SentencePiece-style GGUFs written here with and without the space
prefix, a Qwen3 GGUF), recorded by llama-cpp-python under tests/data/gguf-vocab (``make golden``,
tests/gguf_golden.py); the export's tokenizer check, and ``--tokenizer DIR``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import edgeroute as er
import pytest
from gguf_files import CONTROL, MIXED, USER_DEFINED, write_hf_gguf, write_spm_gguf, write_vocab_gguf

pytestmark = pytest.mark.export
pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from conftest import smollm2_gguf  # noqa: E402
from edgeroute.cli import cli  # noqa: E402
from edgeroute.export import export_model, gguf_tokenizer  # noqa: E402
from edgeroute.export.validate import tokenizer_check  # noqa: E402
from gguf_files import PRE_TEXT, SMOLLM2_SPECIALS, SPM_SPECIALS, TEXTS  # noqa: E402
from gguf_golden import SPM_CHAT, assert_ids_equal, golden_ids  # noqa: E402


def _assert_ids_equal(case: str, gguf: Path, tok: er.Tokenizer, texts: list[str]) -> None:
    """llama.cpp's ids for ``texts`` (tests/gguf_golden.py: recorded from llama-cpp-python by make golden)."""
    assert_ids_equal(case, gguf, lambda text, add: tok.encode(text, add_special_tokens=add), texts)


@pytest.fixture(scope="module", params=[True, False], ids=["llama-style", "gemma-style"])
def spm_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    case = "spm-llama-style" if request.param else "spm-gemma-style"
    path = write_spm_gguf(tmp_path_factory.mktemp("gguf") / "tiny-spm.gguf", add_space_prefix=bool(request.param))
    return case, path


def test_smollm2_bpe_ids_equal_llama_cpp() -> None:
    path = smollm2_gguf()
    hf, vocab = gguf_tokenizer.load(path)
    assert vocab.model == "gpt2" and vocab.pre == "smollm" and vocab.add_bos is False
    tok = er.Tokenizer(hf.backend_tokenizer)
    _assert_ids_equal("smollm2", path, tok, [MIXED, MIXED + SMOLLM2_SPECIALS, *TEXTS])
    assert tok.encode("Hi")[0] != vocab.special["bos"]  # add_bos_token false: no BOS (transformers added one)
    assert tok.decode(tok.encode(MIXED)) == MIXED


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "starcoder"])
def test_each_pre_tokenizer_equals_llama_cpp(pre: str, tmp_path: Path) -> None:
    """SmolLM2's vocabulary under other pre-tokenizer names: llama.cpp's regexes (Llama 3's digit groups of three,
    case-insensitive contractions, its BOS default and whole-word lookup; Qwen2's single digits) are reproduced."""
    path = write_vocab_gguf(tmp_path / f"{pre}.gguf", smollm2_gguf(), pre)
    tok = er.Tokenizer(gguf_tokenizer.load(path)[0].backend_tokenizer)
    _assert_ids_equal(f"pre-{pre}", path, tok, [PRE_TEXT, *TEXTS])
    assert (tok.encode("Hi")[0] == 1) == (pre == "llama-bpe")  # llama.cpp adds BOS by default for Llama 3 only


def test_sentencepiece_ids_equal_llama_cpp(spm_gguf: tuple[str, Path]) -> None:
    case, path = spm_gguf
    hf, vocab = gguf_tokenizer.load(path)
    assert vocab.model == "llama" and gguf_tokenizer.BYTE in vocab.types  # byte fallback pieces
    assert {vocab.types[vocab.tokens.index(t)] for t in CONTROL} == {gguf_tokenizer.CONTROL}
    assert {vocab.types[vocab.tokens.index(t)] for t in USER_DEFINED} == {gguf_tokenizer.USER_DEFINED}
    tok = er.Tokenizer(hf.backend_tokenizer)
    _assert_ids_equal(case, path, tok, [MIXED, MIXED + SPM_SPECIALS, *TEXTS])
    ids = tok.encode(MIXED, add_special_tokens=False)
    assert any(vocab.types[i] == gguf_tokenizer.BYTE for i in ids)  # emoji fell back to bytes
    assert tok.encode("Hi")[0] == 1  # BOS added: add_bos_token
    # text comes back, except that with a space prefix llama.cpp's rule puts a space after each special or
    # user-defined token (MIXED holds "\n\n"), which decoding keeps
    plain = "The capital of France is Paris. 日本語 🤖"
    assert tok.decode(tok.encode(plain)) == plain
    assert (tok.decode(ids) == MIXED) == (not vocab.add_space_prefix)


def test_sentencepiece_gguf_exports_with_its_own_tokenizer(
    spm_gguf: tuple[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    case, path = spm_gguf
    events: list[tuple[str, str, float]] = []
    out = export_model(path, tmp_path / "out", progress=lambda *e: events.append(e))
    # the steps one after another, each counting what it knows; the GGUF's tensors are the load step's count (not
    # transformers' own bar on stderr)
    import gguf

    assert "Converting" not in capfd.readouterr().err
    names = [name for name, event, _ in events if event == "start"]
    assert names == ["load", "export", "validate"]
    ends = [(n, e) for n, e, _ in events if e in ("start", "done")]
    assert ends == [(n, e) for n in names for e in ("start", "done")]  # never nested
    totals = {name: value for name, event, value in events if event == "total"}
    assert totals == {"load": len(gguf.GGUFReader(path).tensors), "export": 2, "validate": 4}
    for name, total in totals.items():
        assert sum(v for n, e, v in events if n == name and e == "advance") == total
    man = json.loads((out / "edgeroute.json").read_text())
    assert man["provenance"]["source_kind"] == "gguf" and man["bos_token_id"] == 1 and man["eos_token_ids"] == [2]
    assert man["chat_template"].startswith("{% for m in messages %}<start_of_turn>")
    t = man["provenance"]["validation"]["tokenizer"]
    assert t["roundtrip"] and t["problems"] == [] and t["chars_per_token"] > 1
    model = er.Model.load(out)
    _assert_ids_equal(case, path, model.tokenizer, [MIXED, *TEXTS])
    chat = [{"role": "user", "content": "Hi"}]
    prompt = model.tokenizer.apply_chat_template(chat)  # as transformers does: the template's text, no BOS added
    text = model.tokenizer.render_chat(chat)
    assert prompt[0] == model.tokenizer.token_to_id("<start_of_turn>")
    assert text == SPM_CHAT and prompt == golden_ids(case, path)[(text, False)]


def test_a_qwen3_gguf_exports_fused_and_equals_its_checkpoint(tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    import numpy as np
    import torch
    import transformers

    ckpt = checkpoint("qwen3_head128", seed=3)
    path = write_hf_gguf(tmp_path / "qwen3.gguf", ckpt, "qwen3")
    out = export_model(path, tmp_path / "out")
    man = json.loads((out / "edgeroute.json").read_text())
    assert man["provenance"]["backend"] == "fused" and man["provenance"]["model_type"] == "qwen3"
    assert man["provenance"]["validation"]["max_abs_logit_diff"] <= 1e-4
    model = er.Model.load(out)
    ids = model.tokenizer.encode("Once upon a time a little robot learned to paint")
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(torch.tensor([ids])).logits[0].numpy()
    got = model.forward_last(np.array([ids]), model.new_cache(), len(ids))[0]
    assert np.abs(got - ref).max() <= 1e-4  # the GGUF's weights are the checkpoint's
    _assert_ids_equal("qwen3", path, model.tokenizer, [MIXED + "<|im_start|>", *TEXTS])


def test_the_check_catches_a_tokenizer_that_splits_words() -> None:
    from tokenizers import Tokenizer

    hf, _ = gguf_tokenizer.load(smollm2_gguf())
    good = tokenizer_check(er.Tokenizer(hf.backend_tokenizer))
    assert good["problems"] == [] and good["whole_word_rate"] == 1.0 and good["whole_words"] > 100
    assert 4 < good["chars_per_token"] < 6
    spec = json.loads(hf.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:300]  # most words now come out in fragments
    bad = tokenizer_check(er.Tokenizer(Tokenizer.from_str(json.dumps(spec))))
    assert bad["whole_word_rate"] < 0.2 and bad["chars_per_token"] < 3
    assert "splits words into fragments" in bad["problems"][0]


def test_unsupported_gguf_tokenizers_are_errors_with_the_hint() -> None:
    base = dict(tokens=["a", "b", "ab"], types=[1, 1, 1], scores=[0.0, 0.0, 0.0], merges=["a b"])
    with pytest.raises(er.ExportError, match="tokenizer model 'bert'.*--tokenizer DIR"):
        gguf_tokenizer.build(gguf_tokenizer.Vocab(model="bert", pre=None, **base))  # type: ignore[arg-type]
    with pytest.raises(er.ExportError, match="pre-tokenizer 'kimi-k2'.*--tokenizer DIR"):
        gguf_tokenizer.build(gguf_tokenizer.Vocab(model="gpt2", pre="kimi-k2", **base))  # type: ignore[arg-type]


def test_cli_tokenizer_dir(tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    ckpt = checkpoint("llama")  # read only: the broken tokenizers are copies
    runner = CliRunner()
    ok = runner.invoke(cli, ["export", str(ckpt), str(tmp_path / "ok"), "--tokenizer", str(ckpt)])
    assert ok.exit_code == 0, ok.output
    assert "tokenizer: round trip yes" in ok.output
    man = json.loads((tmp_path / "ok" / "edgeroute.json").read_text())
    assert man["provenance"]["source"].endswith(f"(tokenizer: {ckpt})")
    # a tokenizer that lowercases: its ids do not decode back to the text -> refused, nothing written
    broken = Path(shutil.copytree(ckpt, tmp_path / "broken", ignore=shutil.ignore_patterns("*.safetensors")))
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    bad = runner.invoke(cli, ["export", str(ckpt), str(tmp_path / "bad"), "--tokenizer", str(broken)])
    assert bad.exit_code == 1 and not (tmp_path / "bad").exists()
    *steps, line = bad.stderr.strip().splitlines()  # the steps' plain lines, then the error on one line
    assert all(s.startswith("export: ") for s in steps)
    assert line.startswith("edgeroute: error: tokenizer check failed: decoding its own ids")
    assert "--tokenizer DIR" in line
    missing = runner.invoke(cli, ["export", str(ckpt), str(tmp_path / "m"), "--tokenizer", str(tmp_path)])
    assert missing.exit_code == 1 and "no tokenizer.json" in missing.stderr
    # a tokenizer with more ids than the model has embedding rows is another model's
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 5000, "content": "<|far|>"})
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    far = runner.invoke(cli, ["export", str(ckpt), str(tmp_path / "far"), "--tokenizer", str(broken)])
    assert far.exit_code == 1 and "embedding rows" in far.stderr, far.output
