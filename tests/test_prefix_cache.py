"""The prefix cache (issue 38): many prompts' KV positions in memory and on disk across restarts, verified to the
byte; a hit never changes a token (fp32: identical to a cold prefill)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import edgeroute as er
import httpx
import numpy as np
import openai
import pytest
from edgeroute.prefix_cache import MAGIC, SUFFIX
from edgeroute.prefix_files import decode
from edgeroute.serve import Settings, create_app
from serve_helpers import Running, cli_server, run_cli

rng = np.random.default_rng(5)
SYSTEMS = [rng.integers(3, 300, 200).tolist() for _ in range(3)]  # three 200-token "system prompts"


def prompt(system: int, question: int) -> list[int]:
    return SYSTEMS[system] + [10 + question, 20 + question, 30 + question]


GREEDY = er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0))
SAMPLED = er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0.9, top_p=0.9, seed=3))


@pytest.fixture(scope="module")
def folder(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny fp32 export (tests change its files)."""
    out = tmp_path_factory.mktemp("pc") / "model"
    shutil.copytree(exported("llama"), out)
    return out


@pytest.fixture(scope="module")
def cold(folder: Path) -> dict[tuple[int, int, str], list[int]]:
    """Every prompt's tokens from a model without a prefix cache."""
    m = er.Model.load(folder)
    return {(s, q, c): m.generate(prompt(s, q), cfg).token_ids for s in range(3) for q in range(3)
            for c, cfg in (("g", GREEDY), ("s", SAMPLED))}  # fmt: skip


def test_hits_equal_a_cold_prefill_generator_and_engine(folder: Path, cold) -> None:
    m = er.Model.load(folder, prefix_cache=True)
    first = m.generate(prompt(0, 0), GREEDY)
    assert first.usage.cached_tokens == 0 and first.token_ids == cold[(0, 0, "g")]
    again = m.generate(prompt(0, 1), SAMPLED)  # another question after the same system prompt
    assert again.usage.cached_tokens == 192 and again.token_ids == cold[(0, 1, "s")]  # 6 blocks of 32
    chat = er.ChatSession(m, GREEDY)
    assert [s.token_id for s in chat.send("hello there")]  # a chat session goes through the Generator too
    hits = m.prefix_cache.stats().hit_tokens
    assert [s.token_id for s in chat.send("and " * 40)]  # a later turn: what its row holds is not a cache hit
    assert m.prefix_cache.stats().hit_tokens == hits
    before = m.prefix_cache.stats().hits
    with er.Engine(m, max_batch=2, prefix_reuse=True) as engine:  # more prompts than slots
        reqs = {(s, q, c): engine.submit(prompt(s, q), cfg) for s in range(3) for q in range(3)
                for c, cfg in (("g", GREEDY), ("s", SAMPLED))}  # fmt: skip
        done = {key: request.result() for key, request in reqs.items()}
    for key, got in done.items():
        assert got.token_ids == cold[key], key
    # served by the cache where no slot held the system prompt (a slot's reuse would give 200 or more)
    assert any(got.usage.cached_tokens == 192 for got in done.values())
    stats = m.prefix_cache.stats()
    assert stats.hits > before and stats.memory_blocks >= 18  # 3 system prompts x 6 blocks, and the chat's
    assert {e.tokens for e in m.prefix_cache.entries()} >= {192}


def test_eviction_keeps_the_budget(folder: Path, cold) -> None:
    probe = er.Model.load(folder, prefix_cache=True)
    block = probe.prefix_cache.block_bytes
    m = er.Model.load(folder, prefix_cache=True, prefix_cache_memory=4 * block)  # four blocks of a prompt's six
    for s in range(3):
        assert m.generate(prompt(s, 0), GREEDY).token_ids == cold[(s, 0, "g")]
        assert m.prefix_cache.stats().memory_bytes <= 4 * block
    st = m.prefix_cache.stats()
    assert st.evicted == 14 and st.memory_blocks == 4  # the latest system prompt's first four blocks (a chain's
    assert m.generate(prompt(2, 1), GREEDY).usage.cached_tokens == 128  # start outlives its end)
    assert m.generate(prompt(0, 1), GREEDY).usage.cached_tokens == 0  # the first was evicted
    m.prefix_cache.drop()
    assert m.prefix_cache.stats().memory_blocks == 0 and m.prefix_cache.entries() == []


def test_restart_restores_from_disk(folder: Path, cold, tmp_path: Path) -> None:
    d = tmp_path / "cache"
    m = er.Model.load(folder, prefix_cache=d)
    assert m.cache_prefix(prompt(0, 0)) == 192 and m.cache_prefix(prompt(1, 0)) == 192
    assert m.cache_prefix(prompt(0, 0)) == 192  # held already: nothing computed again
    m.prefix_cache.close()  # writes what is queued
    assert len(list(d.rglob("*" + SUFFIX))) == 12 and m.prefix_cache.stats().disk_blocks == 12
    again = er.Model.load(folder, prefix_cache=d)  # a restart: the blocks are read back
    got = again.generate(prompt(0, 2), GREEDY)
    assert got.usage.cached_tokens == 192 and got.token_ids == cold[(0, 2, "g")]
    assert again.prefix_cache.stats().disk_reads == 6 and again.prefix_cache.stats().disk_rejected == 0
    # a model whose files changed has another fingerprint: the old blocks are never read
    os.utime(folder / "model.onnx", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = er.Model.load(folder, prefix_cache=d)
    assert changed.prefix_cache.fingerprint != m.prefix_cache.fingerprint
    got = changed.generate(prompt(0, 1), GREEDY)
    assert got.usage.cached_tokens == 0 and got.token_ids == cold[(0, 1, "g")]


def _tamper(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "nested":  # a header JSON nests past the parser's recursion limit
        deep = b"[" * 60000
        path.write_bytes(MAGIC + len(deep).to_bytes(4, "little") + deep)
        return
    if how == "unreadable":  # reading fails (a directory where the file was)
        path.unlink()
        path.mkdir()
        return
    n = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 4], "little")
    header, payload = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n]), raw[len(MAGIC) + 4 + n :]
    if how == "flip":
        payload = payload[:100] + bytes([payload[100] ^ 1]) + payload[101:]
    elif how == "cut":
        payload = payload[: len(payload) // 2]
    elif how == "tokens":  # a forged token list: the file's name (the chain hash) unchanged
        header["tokens"][5] = (header["tokens"][5] + 1) % 300
    elif how == "model":
        header["fingerprint"] = "0" * 64
    head = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(MAGIC + len(head).to_bytes(4, "little") + head + payload)


@pytest.mark.parametrize("how", ["flip", "cut", "tokens", "model", "nested", "unreadable"])
def test_a_tampered_block_is_refused(folder: Path, cold, tmp_path: Path, how: str, caplog) -> None:
    d = tmp_path / "cache"
    m = er.Model.load(folder, prefix_cache=d)
    m.cache_prefix(prompt(1, 0))
    m.prefix_cache.close()
    assert m.prefix_cache.disk is not None
    first = m.prefix_cache.disk.path(m.prefix_cache.keys(prompt(1, 0))[0])
    _tamper(first, how)
    fresh = er.Model.load(folder, prefix_cache=d)
    with caplog.at_level("WARNING", logger="edgeroute.prefix_cache"), er.Engine(fresh, max_batch=2) as engine:
        other = engine.submit(prompt(0, 0), GREEDY)  # runs beside it: untouched by the bad file
        got = engine.submit(prompt(1, 1), GREEDY).result()
        assert other.result().token_ids == cold[(0, 0, "g")]
    assert got.usage.cached_tokens == 0 and got.token_ids == cold[(1, 1, "g")]  # a cold prefill, same tokens
    assert first.name in caplog.text
    if how == "unreadable":  # a miss, nothing removed (reading it failed: it may be readable later)
        assert "cannot read" in caplog.text and fresh.prefix_cache.stats().disk_rejected == 0
        return
    else:
        assert fresh.prefix_cache.stats().disk_rejected == 1 and "refused" in caplog.text
    fresh.prefix_cache.close()  # the refused file was removed, and the block written again from the cold prefill
    again = er.Model.load(folder, prefix_cache=d)
    assert again.generate(prompt(1, 2), GREEDY).usage.cached_tokens == 192
    assert again.prefix_cache.stats().disk_rejected == 0


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import edgeroute as er
    folder, cache, seed, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    expect = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    m = er.Model.load(folder, prefix_cache=cache, threads=1)
    cfg = er.GenerationConfig(max_new_tokens=10, sampling=er.SamplingConfig(temperature=0))
    rng = np.random.default_rng(seed)
    systems = [rng.integers(3, 300, 200).tolist() for _ in range(3)]
    print("started", flush=True)
    for r in range(rounds):
        for s, system in enumerate(systems):
            got = m.generate(system + [7, 8, 9], cfg).token_ids
            if expect is not None and got != expect[s]:
                print("WRONG", s, got, expect[s], flush=True)
                sys.exit(1)
    m.prefix_cache.close()
    st = m.prefix_cache.stats()
    print(json.dumps({"rejected": st.disk_rejected, "reads": st.disk_reads, "writes": st.disk_writes}), flush=True)
    """
)


def _child(folder: Path, cache: Path, seed: int, rounds: int, expect: list[list[int]] | None = None):
    args = [sys.executable, "-c", CHILD, str(folder), str(cache), str(seed), str(rounds)]
    args += [json.dumps(expect)] if expect is not None else []
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_writer_leaves_nothing_trusted_and_two_processes_share_a_directory(folder: Path, tmp_path) -> None:
    d = tmp_path / "cache"
    seed_rng = np.random.default_rng(11)
    systems = [seed_rng.integers(3, 300, 200).tolist() for _ in range(3)]
    ref = er.Model.load(folder)
    expect = [ref.generate(s + [7, 8, 9], GREEDY).token_ids for s in systems]
    killed = _child(folder, d, 11, 1000)
    assert killed.stdout is not None and killed.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60  # killed while it writes: once some blocks are on disk
    while not list(d.rglob("*" + SUFFIX)) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    folder_of_blocks = next(d.rglob("*" + SUFFIX)).parent
    (folder_of_blocks / f".{'ab' * 16}{SUFFIX}.123.4.tmp").write_bytes(MAGIC + b"\x10\x00")  # a cut write
    # two processes read and write the same directory at once: every token right, no file refused
    pair = [_child(folder, d, 11, 3, expect), _child(folder, d, 11, 3, expect)]
    for p in pair:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, out + err
        figures = json.loads(out.strip().splitlines()[-1])
        assert figures["rejected"] == 0, figures
    assert sum(1 for _ in d.rglob("*" + SUFFIX)) == 18  # three prompts' six blocks, each once
    # every file in the directory is whole: the killed writer's files too (a write goes to a temporary name first)
    check = er.Model.load(folder, prefix_cache=d).prefix_cache
    for path in d.rglob("*" + SUFFIX):
        raw = path.read_bytes()
        n = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 4], "little")
        header = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
        assert check.disk is not None
        block = decode(raw, check.fingerprint, check.disk.shape, check.disk.dtype, bytes.fromhex(path.stem),
                       bytes.fromhex(header["parent"]), np.array(header["tokens"]), b"")  # fmt: skip
        assert not isinstance(block, str), (path.name, block)


def test_disk_budget_keeps_what_is_used(folder: Path, tmp_path: Path) -> None:
    """Files go least recently used first, a chain's end before its start: a prefix used from memory keeps its
    files while another, older one loses its blocks."""
    d = tmp_path / "cache"
    m = er.Model.load(folder, prefix_cache=d)
    file_bytes = m.prefix_cache.block_bytes + 2048  # a block and its header, about
    m.prefix_cache.close()
    m = er.Model.load(folder, prefix_cache=d, prefix_cache_disk=14 * file_bytes)  # two prompts' six blocks, and two
    m.cache_prefix(prompt(0, 0))  # A
    m.cache_prefix(prompt(1, 0))  # B
    m.prefix_cache.flush()
    time.sleep(0.05)
    assert m.generate(prompt(0, 1), GREEDY).usage.cached_tokens == 192  # A used again, from memory
    m.prefix_cache.flush()
    time.sleep(0.05)
    m.cache_prefix(prompt(2, 0))  # C: past the budget, the oldest files go
    m.prefix_cache.close()
    assert m.prefix_cache.stats().disk_bytes <= 14 * file_bytes
    again = er.Model.load(folder, prefix_cache=d)
    assert again.generate(prompt(0, 2), GREEDY).usage.cached_tokens == 192  # A kept whole
    assert again.generate(prompt(2, 2), GREEDY).usage.cached_tokens == 192  # C, the newest
    assert again.generate(prompt(1, 2), GREEDY).usage.cached_tokens < 192  # B lost its end


def test_a_failed_write_leaves_nothing(folder: Path, cold, tmp_path: Path, monkeypatch) -> None:
    import edgeroute.prefix_disk as pc

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pc.os, "replace", full)
    d = tmp_path / "cache"
    m = er.Model.load(folder, prefix_cache=d)
    assert m.generate(prompt(0, 0), GREEDY).token_ids == cold[(0, 0, "g")]
    m.prefix_cache.close()
    assert m.prefix_cache.stats().dropped_writes == 6
    assert list(d.rglob("*")) == [next(d.iterdir())]  # the model's folder, empty: no temporary file left
    assert m.generate(prompt(0, 1), GREEDY).usage.cached_tokens == 192  # memory still serves


def test_adapters_never_share_cached_positions(lora_dir: Path) -> None:
    plain = er.Model.load(lora_dir)
    m = er.Model.load(lora_dir, prefix_cache=True)

    def run(model: er.Model, adapter: str | None) -> er.Completion:
        cfg = er.GenerationConfig(max_new_tokens=8, sampling=er.SamplingConfig(temperature=0), adapter=adapter)
        return model.generate(SYSTEMS[0] + [5, 6, 7], cfg)

    assert run(m, "qv4").usage.cached_tokens == 0
    for adapter in ("all8", None):
        got = run(m, adapter)
        assert got.usage.cached_tokens == 0 and got.token_ids == run(plain, adapter).token_ids
    got = run(m, "qv4")
    assert got.usage.cached_tokens == 192 and got.token_ids == run(plain, "qv4").token_ids


def test_no_prefix_reuse_turns_the_cache_off(folder: Path) -> None:
    m = er.Model.load(folder, prefix_cache=True)
    m.cache_prefix(prompt(0, 0))
    with er.Engine(m, max_batch=2, prefix_reuse=False) as engine:
        batched = engine.submit(prompt(0, 1), GREEDY).result()
        solo = engine.submit(prompt(0, 2), GREEDY, draft="ngram").result()
    assert batched.usage.cached_tokens == 0 and solo.usage.cached_tokens == 0


def test_scored_prompts_reuse_the_blocks_that_carry_their_scores(folder: Path) -> None:
    """A scored prompt (``prompt_logprobs``, the server's echo) reuses the prefix cache's blocks that a scored
    prompt with as many alternatives stored, less the last position (fed again: its logits score the next token),
    and the scores they carry: its scores and tokens equal a cold run's. Blocks an unscored prompt stored are not
    reused until a scored prompt gives them their scores; blocks scored with other alternatives are not reused."""
    from edgeroute import scoring

    m, cold = er.Model.load(folder, prefix_cache=True), er.Model.load(folder)

    def scored(n: int) -> er.GenerationConfig:
        return er.GenerationConfig(max_new_tokens=2, prompt_logprobs=n, sampling=er.SamplingConfig(temperature=0))

    def check(got: er.Completion, ids: list[int], n: int) -> None:
        want = scoring.prompt_scores(cold, ids, n)
        assert got.token_ids == cold.generate(ids, scored(n)).token_ids and got.prompt_logprobs is not None
        assert [t.token_id for t in got.prompt_logprobs] == ids[1:]
        assert [t.greedy for t in got.prompt_logprobs] == [t.greedy for t in want]
        np.testing.assert_allclose([t.logprob for t in got.prompt_logprobs], [t.logprob for t in want], atol=1e-5)
        assert [[i for i, _ in t.top] for t in got.prompt_logprobs] == [[i for i, _ in t.top] for t in want]

    with er.Engine(m, max_batch=2) as engine:
        plain = engine.submit(prompt(0, 0), GREEDY).result(timeout=30)  # stores the blocks, without scores
        first = engine.submit(prompt(0, 1), scored(2)).result(timeout=30)
        second = engine.submit(prompt(0, 2), scored(2)).result(timeout=30)
        whole = engine.submit(SYSTEMS[0][:192], scored(2)).result(timeout=30)  # every position of it cached
        other = engine.submit(prompt(0, 0), scored(1)).result(timeout=30)
        again = engine.submit(prompt(0, 0), GREEDY).result(timeout=30)
    assert plain.usage.cached_tokens == 0 and first.usage.cached_tokens == 0  # no block carried scores
    assert second.usage.cached_tokens == whole.usage.cached_tokens == 191  # 6 blocks of 32 less the one fed again
    assert other.usage.cached_tokens == 0  # the blocks carry 2 alternatives a position, not 1
    assert again.usage.cached_tokens >= 192 and again.token_ids == plain.token_ids
    check(first, prompt(0, 1), 2)
    check(second, prompt(0, 2), 2)
    check(other, prompt(0, 0), 1)
    check(whole, SYSTEMS[0][:192], 2)


# -- the server and the CLI ---------------------------------------------------------------------------------------
def test_server_reports_cached_tokens_and_metrics(folder: Path, tmp_path: Path) -> None:
    m = er.Model.load(folder, prefix_cache=tmp_path / "cache")
    with Running(create_app(m, Settings("tiny", max_batch=1))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        first = c.completions.create(model="tiny", prompt=prompt(2, 0), max_tokens=4, temperature=0)
        c.completions.create(model="tiny", prompt=prompt(1, 0), max_tokens=4, temperature=0)  # takes the one slot
        second = c.completions.create(model="tiny", prompt=prompt(2, 1), max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 192  # from the prefix cache, not the slot
        hello = [{"role": "user", "content": "hi"}]
        stream = c.chat.completions.create(
            model="tiny", messages=hello, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert chunks[-1].usage.prompt_tokens_details is not None
        text = httpx.get(srv.url + "/metrics", timeout=5).text
    assert "edgeroute_prefix_cache_hits 1.0" in text and "edgeroute_prefix_cache_hit_tokens 192.0" in text
    assert "edgeroute_prefix_cache_misses 3.0" in text  # the first two, and the chat
    assert "edgeroute_prefix_cache_disk_bytes" in text


def test_echoed_prompts_reuse_scored_blocks_through_the_server(folder: Path) -> None:
    """lm-evaluation-harness's requests (``echo`` with ``logprobs``, one token generated) on a server with a prefix
    cache: the second choice of an item reuses the first's context and gives what a cold server gives."""
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    answers = {}
    for cache in (True, None):
        m = er.Model.load(folder, prefix_cache=cache)
        with Running(create_app(m, Settings("tiny", max_batch=2))) as srv:
            got = []
            for q in range(2):
                r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": prompt(1, q)}, timeout=60)
                assert r.status_code == 200, r.text
                got.append(r.json())
        answers[cache] = got
    cached, plain = answers[True], answers[None]
    assert [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in cached] == [0, 191]
    for a, b in zip(cached, plain, strict=True):
        la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["token_logprobs"][0] is None
        np.testing.assert_allclose(la["token_logprobs"][1:], lb["token_logprobs"][1:], atol=1e-5)
        assert [list(d) for d in la["top_logprobs"][1:]] == [list(d) for d in lb["top_logprobs"][1:]]


def test_serve_keeps_a_prefix_cache_in_memory_by_default(folder: Path) -> None:
    """``edgeroute serve`` gives a model that can hold one a prefix cache in memory unless told otherwise: an echoed
    prompt (the slots cannot serve it: they keep no scores) reuses the blocks of the one before; --no-prefix-cache
    keeps none; an explicit cache and --no-prefix-cache or --no-prefix-reuse contradict each other."""
    body = {"model": "tiny", "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    got = {}
    for flags in ((), ("--no-prefix-cache",)):
        with cli_server(str(folder), "--model-name", "tiny", *flags) as (proc, url):
            cached = []
            for q in range(2):
                r = httpx.post(url + "/v1/completions", json={**body, "prompt": prompt(0, q)}, timeout=60)
                assert r.status_code == 200, r.text
                cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            text = httpx.get(url + "/metrics", timeout=5).text
            hits = [x for x in text.splitlines() if x.startswith("edgeroute_prefix_cache_hits ")]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        got[flags] = cached, hits
    assert got[()] == ([0, 191], ["edgeroute_prefix_cache_hits 1.0"])
    assert got[("--no-prefix-cache",)] == ([0, 0], ["edgeroute_prefix_cache_hits 0.0"])
    for flags in (["--no-prefix-cache", "--prefix-cache-mb", "64"], ["--no-prefix-reuse", "--prefix-cache", "d"]):
        out = run_cli("serve", str(folder), *flags)
        assert out.returncode == 2 and "contradict each other" in out.stderr and "Traceback" not in out.stderr


def test_cli_prefix_cache_across_runs(folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from edgeroute.cli import cli

    d = tmp_path / "cache"
    text = "The robot paints. " * 30
    args = ["run", str(folder), text, "--prefix-cache", str(d), "--max-new-tokens", "5", "--temperature", "0"]
    one = CliRunner().invoke(cli, [*args, "--json"])
    assert one.exit_code == 0, one.output
    assert list(d.rglob("*" + SUFFIX))  # written by the first run
    two = CliRunner().invoke(cli, [*args, "--json"])
    assert json.loads(two.output)["token_ids"] == json.loads(one.output)["token_ids"]
    bad = CliRunner().invoke(cli, ["run", str(folder), "x", "--prefix-cache-disk-mb", "5"])
    assert bad.exit_code == 2 and "add --prefix-cache DIR" in bad.output
