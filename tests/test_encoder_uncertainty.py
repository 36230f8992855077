"""Stochastic passes through a fine-tune's own dropout (issue 36, "random paths per layer"): the export puts every
dropout layer behind a graph input that is off by default; ``samples=N`` runs N rows per text with it on and
returns the mean with its spread, predictive entropy and mutual information; through the library, ``edgeroute
run -n N`` and the server's ``samples``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import edgeroute as er
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from edgeroute.cli import cli
from edgeroute.encoder_math import uncertainty

pytestmark = pytest.mark.export
TEXTS = ["Paris is the capital of France.", "Once upon a time a little robot learned to paint the sea."]


def test_uncertainty_is_entropy_and_mutual_information() -> None:
    """Hand-computed: two disagreeing passes have mutual information, identical ones none; sigmoid per label."""
    passes = np.array([[[0.9, 0.1], [0.1, 0.9]], [[0.5, 0.5], [0.5, 0.5]]])  # [texts, samples, labels]
    mean, entropy, information = uncertainty(passes, "softmax")
    h = lambda p: -sum(x * np.log(x) for x in p)  # noqa: E731
    np.testing.assert_allclose(mean, [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(entropy, [h([0.5, 0.5])] * 2)
    np.testing.assert_allclose(information, [h([0.5, 0.5]) - h([0.9, 0.1]), 0.0], atol=1e-12)
    mean, entropy, information = uncertainty(np.array([[[0.9, 0.2], [0.7, 0.2]]]), "sigmoid")
    np.testing.assert_allclose(entropy[0], [h([0.8, 0.2]), h([0.2, 0.8])])
    np.testing.assert_allclose(information[0], [h([0.8, 0.2]) - (h([0.9, 0.1]) + h([0.7, 0.3])) / 2, 0.0], atol=1e-12)
    assert uncertainty(passes, "none")[1] is None


def torch_passes(ckpt: Path, text: str, samples: int, head: str) -> np.ndarray:
    """PyTorch's own Monte-Carlo dropout (train mode): ``samples`` passes' probabilities."""
    import torch
    import transformers

    auto = getattr(transformers, head)
    model = auto.from_pretrained(ckpt).train()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    batch = tok([text] * samples, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1).numpy()


def test_stochastic_passes_are_the_fine_tunes_dropout(tiny_tagger: tuple[Path, Path], tmp_path: Path) -> None:
    """The tagger's export switches its 8 dropout layers; with ``samples`` each token's mean tag probability is
    PyTorch's train-mode mean (64 passes each side, within sampling error); without, the graph is deterministic."""
    ckpt, out = tiny_tagger
    model = er.EncoderModel.load(out)
    manifest = json.loads((out / "edgeroute.json").read_text())
    assert manifest["dropout_input"] == "dropout" and manifest["dropout_layers"] == 8  # embeddings, 3 per layer, head
    plain = model.entities(TEXTS, aggregation="none", ignore_labels=())
    assert plain == model.entities(TEXTS, aggregation="none", ignore_labels=())  # deterministic by default
    mc = model.entities(TEXTS[0], aggregation="none", ignore_labels=(), samples=64)[0]
    assert all(e.entropy is not None and e.mutual_information is not None for e in mc)
    assert all(e.entropy >= e.mutual_information > 0 for e in mc)
    assert [e.score for e in mc] != [e.score for e in plain[0]]
    want = torch_passes(ckpt, TEXTS[0], 64, "AutoModelForTokenClassification").mean(0)
    for e in mc:
        assert abs(e.score - want[e.index, model.labels.index(e.label)]) < 0.08, e
    grouped = model.entities(TEXTS, samples=4)
    assert all(e.entropy is not None for g in grouped for e in g)
    for bad in (0, 65, True, 2.0):
        with pytest.raises(er.ConfigError) as err:
            model.entities(TEXTS, samples=bad)  # type: ignore[arg-type]
        assert err.value.field == "samples"
    old = tmp_path / "old"  # an export without the switch (as before it existed): samples refused, named
    shutil.copytree(out, old)
    manifest.pop("dropout_input")
    (old / "edgeroute.json").write_text(json.dumps(manifest))
    with pytest.raises(er.ConfigError, match="re-export") as err:
        er.EncoderModel.load(old).entities(TEXTS, samples=4)
    assert err.value.field == "samples"


def test_classifier_passes_through_the_library_the_command_line_and_the_server(tmp_path: Path) -> None:
    from checkpoints import write_sequence_classifier
    from edgeroute.export import export_model
    from edgeroute.serve import Settings
    from edgeroute.serve.embeddings import create_embedding_app
    from serve_helpers import Running

    ckpt = write_sequence_classifier(tmp_path / "ckpt")
    out = export_model(ckpt, tmp_path / "model")
    model = er.EncoderModel.load(out)
    labels = model.classify(TEXTS[0], top_k=None, samples=64)[0]
    assert all(x.std is not None and x.std > 0 and x.entropy == labels[0].entropy for x in labels)
    assert labels[0].entropy >= labels[0].mutual_information > 0  # (softmax: the text's, on every label)
    want = torch_passes(ckpt, TEXTS[0], 64, "AutoModelForSequenceClassification").mean(0)
    for x in labels:
        assert abs(x.score - want[model.labels.index(x.label)]) < 0.08
    assert abs(sum(x.score for x in labels) - 1) < 1e-6
    res = CliRunner().invoke(cli, ["run", str(out), TEXTS[0], "-n", "8", "--json"])
    rows = json.loads(res.output)["labels"]
    assert res.exit_code == 0 and all({"std", "entropy", "mutual_information"} <= set(r) for r in rows)
    res = CliRunner().invoke(cli, ["run", str(out), TEXTS[0], "-n", "8"])
    assert " MI " in res.output.splitlines()[0]
    with Running(create_embedding_app(model, Settings("cls"))) as srv:
        r = httpx.post(srv.url + "/predict", json={"inputs": [*TEXTS, "a"], "samples": 8}, timeout=30).json()
        assert all("mutual_information" in x for row in r for x in row)
        plain = httpx.post(srv.url + "/predict", json={"inputs": [*TEXTS, "a"]}, timeout=30).json()
        assert all("entropy" not in x for row in plain for x in row)
        bad = httpx.post(srv.url + "/predict", json={"inputs": TEXTS, "samples": 1000}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "samples", bad.text


def test_ner_route_and_command_line_passes(tiny_tagger: tuple[Path, Path], encoder_dir: Path) -> None:
    from edgeroute.serve import Settings
    from edgeroute.serve.embeddings import create_embedding_app
    from serve_helpers import Running

    model = er.EncoderModel.load(tiny_tagger[1])
    with Running(create_embedding_app(model, Settings("ner"))) as srv:
        r = httpx.post(srv.url + "/ner", json={"inputs": TEXTS[0], "samples": 8}, timeout=30).json()
        assert r and all(x["entropy"] >= x["mutual_information"] >= 0 for x in r)
    res = CliRunner().invoke(cli, ["run", str(tiny_tagger[1]), TEXTS[0], "-n", "4", "--json"])
    assert all("mutual_information" in x for x in json.loads(res.output)["entities"])
    res = CliRunner().invoke(cli, ["run", str(encoder_dir), TEXTS[0], "-n", "4"])
    assert res.exit_code == 2 and "-n (stochastic passes) is for classifiers" in res.output
