"""``edgeroute serve`` for an embedding model (``serve/embeddings.py``): OpenAI's ``/v1/embeddings`` through the
official client (strings, token arrays, base64, dimensions), text-embeddings-inference's ``/embed``, requests of
several clients batched into shared runs, and the 4xx of every bad request."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import edgeroute as er
import httpx
import numpy as np
import pytest
from edgeroute.serve import Settings
from edgeroute.serve.embeddings import MAX_INPUTS, create_embedding_app
from serve_helpers import Running, openai_client

pytestmark = pytest.mark.export
NAME = "tiny-embed"
TEXTS = ["The capital of France is Paris.", "Hello world!", "a"]


@pytest.fixture(scope="module")
def model(encoder_dir: Path) -> er.EncoderModel:
    return er.EncoderModel.load(encoder_dir)


@pytest.fixture(scope="module")
def server(model: er.EncoderModel):
    with Running(create_embedding_app(model, Settings(NAME))) as srv:
        yield srv


def test_openai_embeddings_through_the_official_client(model: er.EncoderModel, server: Running) -> None:
    client = openai_client(server)
    want = model.embed(TEXTS).vectors
    r = client.embeddings.create(model=NAME, input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == NAME
    np.testing.assert_allclose([d.embedding for d in r.data], want, atol=1e-6)
    assert r.usage.prompt_tokens == sum(model.count_tokens(TEXTS))
    one = client.embeddings.create(model=NAME, input="Hello world!", dimensions=8)
    np.testing.assert_allclose(one.data[0].embedding, model.embed(["Hello world!"], dimensions=8).vectors[0], atol=1e-6)
    ids = model.tokenize(["Hello world!"])[0][0].tolist()  # a token array is embedded as given
    by_ids = client.embeddings.create(model=NAME, input=[ids])
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-6)
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"input": TEXTS[:1], "encoding_format": "base64"}, timeout=30
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, want[0], atol=1e-6)


def test_text_embeddings_inference_embed(model: er.EncoderModel, server: Running) -> None:
    r = httpx.post(server.url + "/embed", json={"inputs": TEXTS}, timeout=30)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json(), model.embed(TEXTS).vectors, atol=1e-6)
    raw = httpx.post(server.url + "/embed", json={"inputs": "a", "normalize": False}, timeout=30).json()
    np.testing.assert_allclose(raw[0], model.embed(["a"], normalize=False).vectors[0], atol=1e-6)
    long = " ".join(["the sea and the sky"] * 20)
    cut = httpx.post(server.url + "/embed", json={"inputs": long, "truncate": True}, timeout=30).json()
    np.testing.assert_allclose(cut[0], model.embed([long], overflow="truncate").vectors[0], atol=1e-6)


def test_requests_of_several_clients_share_runs(model: er.EncoderModel, server: Running) -> None:
    """16 clients at once: each gets its own rows, equal to embedding them alone, in fewer graph calls than
    requests (the queue joins waiting requests)."""
    texts = [f"{t} number {i}" for i in range(16) for t in TEXTS[:2]]
    want = model.embed(texts).vectors
    before = httpx.get(server.url + "/health", timeout=10).json()
    answers: dict[int, Any] = {}

    def client(i: int) -> None:
        body = {"input": texts[2 * i : 2 * i + 2]}
        answers[i] = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(16):
        np.testing.assert_allclose([d["embedding"] for d in answers[i]["data"]], want[2 * i : 2 * i + 2], atol=1e-5)
    after = httpx.get(server.url + "/health", timeout=10).json()
    assert after["requests"] - before["requests"] == 16 and after["runs"] - before["runs"] < 16


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {"input": ""}, 400, "input[0]"),
        ("/v1/embeddings", {"input": ["ok", 3]}, 400, "input[1]"),
        ("/v1/embeddings", {"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
        ("/v1/embeddings", {"input": [" ".join(["word"] * 60)]}, 400, "input[0]"),
        ("/v1/embeddings", {"input": [[10**7]]}, 400, "input[0]"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": "x", "model": "other"}, 404, "model"),
        ("/v1/embeddings", {"input": "x", "temperature": 1}, 400, "temperature"),
        ("/embed", {"inputs": "x", "truncation_direction": "left"}, 400, "truncation_direction"),
        ("/embed", {"input": "x"}, 400, "input"),
    ],
)
def test_mistakes_are_4xx_naming_the_parameter(
    server: Running, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # the server lives on


def test_the_command_serves_an_embedding_model_behind_its_key(model: er.EncoderModel, encoder_dir: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from serve_helpers import free_port, wait_until

    port = free_port()
    cmd = [sys.executable, "-m", "edgeroute.cli", "serve", str(encoder_dir), "--port", str(port)]
    cmd += ["--model-name", "e", "--log-level", "warning"]
    env = {**os.environ, "EDGEROUTE_API_KEY": "k"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 60)
        assert httpx.post(url + "/v1/embeddings", json={"input": "x"}, timeout=10).status_code == 401
        r = httpx.post(url + "/v1/embeddings", json={"input": "Hello world!"}, headers={"Authorization": "Bearer k"})
        np.testing.assert_allclose(
            r.json()["data"][0]["embedding"], model.embed(["Hello world!"]).vectors[0], atol=1e-6
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.communicate(timeout=5)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_classifier_answers_predict(tmp_path: Path) -> None:
    """A classifier's server: TEI's ``/predict`` (one text, several, ``raw_scores``), equal to ``classify``; its
    embedding routes are absent, every bad request a 4xx naming the parameter."""
    from checkpoints import write_sequence_classifier
    from edgeroute.export import export_model

    folder = export_model(write_sequence_classifier(tmp_path / "ckpt"), tmp_path / "model")
    model = er.EncoderModel.load(folder)
    with Running(create_embedding_app(model, Settings("cls"))) as srv:
        one = httpx.post(srv.url + "/predict", json={"inputs": TEXTS[0]}, timeout=30).json()
        want = model.classify(TEXTS, top_k=None)
        assert [x["label"] for x in one] == [x.label for x in want[0]]
        np.testing.assert_allclose([x["score"] for x in one], [x.score for x in want[0]], atol=1e-6)
        many = httpx.post(srv.url + "/predict", json={"inputs": TEXTS}, timeout=30).json()
        assert [[x["label"] for x in r] for r in many] == [[x.label for x in w] for w in want]
        raw = httpx.post(srv.url + "/predict", json={"inputs": "a", "raw_scores": True}, timeout=30).json()
        np.testing.assert_allclose(
            [x["score"] for x in raw],
            [x.score for x in model.classify(["a"], top_k=None, function="none")[0]],
            atol=1e-5,
        )
        wrong = httpx.post(srv.url + "/v1/embeddings", json={"input": "a"}, timeout=30)
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model", wrong.text
        for body, param in (({"inputs": []}, "inputs"), ({"inputs": "a", "top_k": 2}, "top_k")):
            r = httpx.post(srv.url + "/predict", json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_embed_overflow_and_tokenize(model: er.EncoderModel, server: Running) -> None:
    """``overflow: "chunk"`` runs a long input in windows (usage counts every window's tokens); ``truncate`` and
    ``overflow`` must agree; TEI's ``/tokenize`` gives each token with its character offsets."""
    long = " ".join(["the sea and the sky"] * 20)
    r = httpx.post(server.url + "/v1/embeddings", json={"input": long, "overflow": "chunk"}, timeout=30).json()
    want = model.embed([long], overflow="chunk")
    np.testing.assert_allclose(r["data"][0]["embedding"], want.vectors[0], atol=1e-6)
    assert r["usage"]["prompt_tokens"] == want.tokens[0] > model.max_length
    for body, param in (
        ({"inputs": long, "truncate": False, "overflow": "truncate"}, "truncate"),
        ({"inputs": long, "overflow": "drop"}, "overflow"),
        ({"inputs": long}, "inputs[0]"),
    ):
        r = httpx.post(server.url + "/embed", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    text = "Hello world!"
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": text}, timeout=30).json()[0]
    enc = model.encodings([text])[0]
    assert [t["id"] for t in tokens] == enc.ids and tokens[0]["special"] and tokens[0]["start"] is None
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens if not t["special"])
    bare = httpx.post(server.url + "/tokenize", json={"inputs": [text], "add_special_tokens": False}, timeout=30)
    assert [t["id"] for t in bare.json()[0]] == enc.ids[1:-1]
    for path in ("/predict", "/rerank", "/ner"):  # the routes of other tasks
        r = httpx.post(server.url + path, json={"inputs": "x", "query": "q", "texts": ["x"]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "embedding model" in r.text


def test_a_tagger_answers_ner(tiny_tagger: tuple[Path, Path]) -> None:
    """``/ner``: entities shaped as the Hugging Face pipeline gives them (``entity_group``; ``entity`` and
    ``index`` without aggregation), with the pipeline's parameters and edgeroute's; bad requests named."""
    model = er.EncoderModel.load(tiny_tagger[1])
    texts = ["Paris is the capital of France, and Rome the capital of Italy.", "Das Mädchen läuft zum Meer!"]
    long = " ".join(texts * 6)
    with Running(create_embedding_app(model, Settings("ner"))) as srv:
        one = httpx.post(srv.url + "/ner", json={"inputs": texts[0]}, timeout=30).json()
        assert [(x["entity_group"], x["start"], x["end"]) for x in one] == [
            (e.label, e.start, e.end) for e in model.entities(texts[0])[0]
        ]
        body = {"inputs": texts, "aggregation_strategy": "none", "ignore_labels": []}
        tokens = httpx.post(srv.url + "/ner", json=body, timeout=30).json()
        want = model.entities(texts, aggregation="none", ignore_labels=())
        assert [[(x["entity"], x["index"]) for x in g] for g in tokens] == [
            [(e.label, e.index) for e in w] for w in want
        ]
        body = {"inputs": long, "stride": 16, "words": "text", "decode": "viterbi", "aggregation_strategy": "first"}
        windows = httpx.post(srv.url + "/ner", json=body, timeout=30).json()
        want_long = model.entities(long, stride=16, words="text", decode="viterbi", aggregation="first")[0]
        assert [(x["word"], x["start"]) for x in windows] == [(e.word, e.start) for e in want_long]
        for bad, param in (
            ({"inputs": long}, "inputs[0]"),
            ({"inputs": "x", "aggregation_strategy": "mean"}, "aggregation_strategy"),
            ({"inputs": "x", "stride": 500}, "stride"),
            ({"inputs": "x", "decode": "beam"}, "decode"),
            ({"inputs": "x", "ignore_labels": "O"}, "ignore_labels"),
            ({"inputs": [""]}, "inputs[0]"),
            ({"inputs": [[1, 2]]}, "inputs[0]"),
            ({"inputs": "x", "top_k": 1}, "top_k"),
        ):
            r = httpx.post(srv.url + "/ner", json=bad, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_a_cross_encoder_answers_rerank_and_pairs(tmp_path: Path) -> None:
    """TEI's ``/rerank`` (best first, ``index`` into ``texts``, ``return_text``, ``raw_scores``) equal to
    ``rerank``; ``/predict`` takes [text, pair] arrays."""
    from checkpoints import write_sequence_classifier
    from edgeroute.export import export_model

    ckpt = write_sequence_classifier(tmp_path / "ckpt", "regression", 1)
    model = er.EncoderModel.load(export_model(ckpt, tmp_path / "model"))
    query = "the capital of France"
    with Running(create_embedding_app(model, Settings("ce"))) as srv:
        r = httpx.post(srv.url + "/rerank", json={"query": query, "texts": TEXTS, "return_text": True}, timeout=30)
        want = model.rerank(query, TEXTS)
        assert [x["index"] for x in r.json()] == [w.index for w in want]
        np.testing.assert_allclose([x["score"] for x in r.json()], [w.score for w in want], atol=1e-6)
        assert [x["text"] for x in r.json()] == [TEXTS[w.index] for w in want]
        raw = httpx.post(srv.url + "/rerank", json={"query": query, "texts": TEXTS, "raw_scores": True}, timeout=30)
        want_raw = model.rerank(query, TEXTS, raw_scores=True)
        np.testing.assert_allclose([x["score"] for x in raw.json()], [w.score for w in want_raw], atol=1e-6)
        pair = httpx.post(srv.url + "/predict", json={"inputs": [query, TEXTS[0]]}, timeout=30).json()
        assert pair[0]["score"] == pytest.approx(model.classify(query, pairs=[TEXTS[0]])[0][0].score, abs=1e-6)
        for bad, param in (
            ({"query": "", "texts": TEXTS}, "query"),
            ({"query": query, "texts": []}, "texts"),
            ({"query": query, "texts": [3]}, "texts[0]"),
            ({"query": query, "texts": TEXTS, "top_n": 1}, "top_n"),
            ({"query": query, "texts": [" ".join(["the sea"] * 40)]}, "texts[0]"),
        ):
            r = httpx.post(srv.url + "/rerank", json=bad, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_concurrent_reranks_get_their_own_indices_and_bounds_hold(tmp_path: Path, encoder_dir: Path) -> None:
    """Requests joined into one run each get indices into their own texts (return_text too); inputs that could
    fail a shared run are refused before it: a query with no room for its texts, an input needing more than the
    window bound; ``samples: 0`` is a 400."""
    from checkpoints import write_sequence_classifier
    from edgeroute.encoder_runs import MAX_WINDOWS
    from edgeroute.export import export_model

    model = er.EncoderModel.load(
        export_model(write_sequence_classifier(tmp_path / "ckpt", "regression", 1), tmp_path / "m")
    )
    docs = [[f"{t} number {i} {j}" for j, t in enumerate(TEXTS)] for i in range(8)]
    answers: dict[int, Any] = {}
    with Running(create_embedding_app(model, Settings("ce"))) as srv:

        def client(i: int) -> None:
            body = {"query": "the sea", "texts": docs[i], "return_text": True}
            answers[i] = httpx.post(srv.url + "/rerank", json=body, timeout=60).json()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(8):
            want = model.rerank("the sea", docs[i])
            assert [x["index"] for x in answers[i]] == [w.index for w in want], answers[i]
            assert [x["text"] for x in answers[i]] == [docs[i][w.index] for w in want]
        long_query = " ".join(["the sea"] * 40)
        r = httpx.post(srv.url + "/rerank", json={"query": long_query, "texts": ["a"], "truncate": True}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "query", r.text
        r = httpx.post(srv.url + "/predict", json={"inputs": TEXTS, "samples": 0}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "samples", r.text
    huge = " ".join(["the sea and the sky"] * (MAX_WINDOWS * 8))  # (the tiny embedder's windows: 30 tokens)
    with Running(create_embedding_app(er.EncoderModel.load(encoder_dir), Settings("e"))) as srv:
        r = httpx.post(srv.url + "/embed", json={"inputs": ["ok", huge], "overflow": "chunk"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "inputs[1]", r.text
