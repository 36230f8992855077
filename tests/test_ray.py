"""edgeroute's server as a Ray Serve deployment (``edgeroute serve --ray``, ``edgeroute.serve.ray``).

The proxy's error middleware is pure ASGI and tested without Ray (``tests/test_asgi.py``); the command is tested
for real: a local Ray cluster with 2 CPUs, 2 replicas of the tiny shared-KV model, the official client, a replica
killed mid-stream, and a joined cluster (``ray start --head``) whose deployment is removed on SIGTERM while the
cluster lives on. Every wait is bounded in time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import edgeroute as er
import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed")  # make test installs it

from edgeroute.serve import Settings, create_app  # noqa: E402
from serve_helpers import Running, free_port, run_cli, wait_until  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.ray
NAME = "tiny"


# -- the command's mistakes (no cluster started) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("ray") / NAME, kv_layout="shared")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--replicas", "2"], 2, "--replicas need --ray"),
        (["--ray", "--autoscaling", "{max"], 2, "--autoscaling"),
        (["--ray", "--autoscaling", "[1]"], 2, "must be a JSON object"),
        (["--ray", "--ray-cpus", "2", "--ray-address", "auto"], 2, "--ray-cpus sizes a local cluster"),
        (["--ray", "--replicas", "3", "--ray-cpus", "2"], 1, "3 replicas of 1 CPUs need 3 CPUs"),
    ],
)
def test_the_commands_mistakes_are_one_line(folder: Path, args: list[str], code: int, message: str) -> None:
    r = run_cli("serve", str(folder), *args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_missing_folder_is_refused_before_a_cluster_starts(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run_cli("serve", str(tmp_path / "nothing"), "--ray")
    assert r.returncode == 1 and "edgeroute: error:" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30  # no Ray cluster was started for it


def test_the_deployment_takes_its_bounds_from_the_settings_and_passes_autoscaling_through(folder: Path) -> None:
    from edgeroute.serve.ray import deployment

    fixed = deployment(folder, Settings(NAME, max_batch=4, max_queue=3), replicas=3, cpus_per_replica=1.5)
    d = fixed._bound_deployment  # Ray's Application holds its Deployment there
    assert (d.num_replicas, d.max_ongoing_requests, d.max_queued_requests) == (3, 4, 3)
    assert d.ray_actor_options["num_cpus"] == 1.5
    assert d.init_args == (str(folder.resolve()), Settings(NAME, max_batch=4, max_queue=3), "cpu", 2, None)
    scaled = deployment(folder, Settings(NAME), autoscaling_config={"min_replicas": 1, "max_replicas": 3}, threads=3)
    config = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 3) and scaled._bound_deployment.init_args[3] == 3
    with pytest.raises(er.ConfigError, match="replicas"):
        deployment(folder, Settings(NAME), replicas=0)
    with pytest.raises(er.ModelLoadError):
        deployment(folder.parent / "nothing", Settings(NAME))


# -- a local cluster: 2 replicas ------------------------------------------------------------------------------------
class Command:
    """``edgeroute serve --ray ...`` in a subprocess (its stderr read by a thread), stopped with SIGTERM (killed if
    it hangs)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "edgeroute.cli", "serve", *args, "--ray", "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def ready(self, replicas: int, seconds: float = 150) -> dict[str, Any]:
        """Waits for the command's ready line, then for /health to show ``replicas`` running and healthy."""
        seen: list[dict[str, Any]] = []

        def up() -> bool:
            assert self.proc.poll() is None, self.err[-3000:]
            if "edgeroute: serving" not in self.err:
                return False
            h = httpx.get(self.url + "/health", timeout=5)
            d = h.json()["deployment"] if h.status_code == 200 else {}
            seen[:] = [h.json()]
            return d.get("replica_states") == {"RUNNING": replicas} and d.get("status") == "HEALTHY"

        wait_until(up, seconds, show=lambda: (seen, self.err[-2000:]))
        return seen[0]

    def stop(self, seconds: float = 60) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the command did not stop within {seconds} s: {self.err[-2000:]}") from None
        self.reader.join(10)
        return self.proc.returncode, self.err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


REQUESTS = [
    *(
        {"kind": "chat", "messages": [{"role": "user", "content": f"question {i}"}], "seed": i, "temperature": 0.9}
        for i in range(6)
    ),
    *({"kind": "chat", "messages": [{"role": "user", "content": f"say {i}"}], "temperature": 0} for i in range(2)),
    *(
        {"kind": "chat-stream", "messages": [{"role": "user", "content": f"tell {i}"}], "seed": 10 + i}
        for i in range(4)
    ),
    *({"kind": "text", "prompt": f"once upon {i}", "seed": 20 + i, "temperature": 0.7} for i in range(2)),
    *({"kind": "text-stream", "prompt": f"a b c {i}", "seed": 30 + i} for i in range(2)),
]
assert len(REQUESTS) == 16


def ask(url: str, req: dict[str, Any]) -> tuple[str, str | None]:
    """The request's text and the pid of the process that answered (None through the single server)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    args = {k: v for k, v in req.items() if k != "kind"}
    if req["kind"] == "chat":
        raw = client.chat.completions.with_raw_response.create(model=NAME, max_tokens=24, **args)
        return raw.parse().choices[0].message.content or "", raw.headers.get("x-edgeroute-pid")
    if req["kind"] == "text":
        raw = client.completions.with_raw_response.create(model=NAME, max_tokens=24, **args)
        return raw.parse().choices[0].text, raw.headers.get("x-edgeroute-pid")
    # streams: the raw SSE lines, to see the [DONE] the client hides
    path = "/v1/chat/completions" if req["kind"] == "chat-stream" else "/v1/completions"
    body = {"model": NAME, "max_tokens": 24, "stream": True, **args}
    text, events = "", []
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        pid = r.headers.get("x-edgeroute-pid")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]" and len(events) < 200
    for e in events[:-1]:
        choice = json.loads(e)["choices"][0]
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, pid


def test_two_replicas_answer_like_one_server_and_a_killed_one_is_replaced(folder: Path) -> None:
    # the single server's answers, in-process, at the same seeds (one thread, as each replica runs)
    single = er.Model.load(folder, threads=1)
    with Running(create_app(single, Settings(NAME))) as srv, ThreadPoolExecutor(8) as pool:
        expected = [t for t, _ in pool.map(lambda r: ask(srv.url, r), REQUESTS)]

    cmd = Command(str(folder), "--replicas", "2", "--ray-cpus", "2", "--model-name", NAME)
    try:
        health = cmd.ready(2)
        assert health["status"] == "ok" and health["deployment"]["status"] == "HEALTHY"
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: ask(cmd.url, r), REQUESTS))
        assert [t for t, _ in got] == expected
        pids = {p for _, p in got}
        assert None not in pids and len(pids) == 2, pids  # both replicas answered

        # kill the replica serving a long stream right after its first chunk
        client = openai.OpenAI(base_url=cmd.url + "/v1", api_key="none", max_retries=0, timeout=60)
        raw = client.completions.with_raw_response.create(
            model=NAME, prompt="go", max_tokens=480, extra_body={"min_tokens": 480}, stream=True
        )
        victim = int(raw.headers["x-edgeroute-pid"])
        (survivor,) = {int(p) for p in pids if p is not None} - {victim}
        chunks = raw.parse()
        with pytest.raises(openai.APIError, match="replica serving this request stopped"):
            for n, _ in enumerate(chunks):
                if n == 0:
                    os.kill(victim, signal.SIGKILL)
                assert n < 1000
        # the other replica keeps serving while Ray replaces the dead one
        replaced: set[int] = set()
        end = time.monotonic() + 90
        while time.monotonic() < end:
            text, pid = ask(cmd.url, REQUESTS[0])
            assert text == expected[0]
            replaced.add(int(pid or 0))
            if replaced - {victim, survivor}:
                break
            time.sleep(0.2)
        assert replaced - {victim, survivor}, f"no new replica within 90 s: {replaced}"
        health = cmd.ready(2, 60)
        assert health["deployment"]["status"] == "HEALTHY"

        # a request not streamed (16 choices of 480 tokens with logprobs: ~2 s), its replica killed while it runs
        # (the one whose CPU time grows): a 503 in OpenAI's body, not a bare 500
        pids = {int(p) for p in replaced - {victim}}
        assert len(pids) == 2
        long = {"model": NAME, "prompt": "go", "max_tokens": 480, "n": 16, "logprobs": 5}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.completions.create, **long, extra_body={"min_tokens": 480})
            base = {p: cpu_seconds(p) for p in pids}
            busy = None
            end = time.monotonic() + 10
            while busy is None and time.monotonic() < end and not pending.done():
                time.sleep(0.05)
                busy = next((p for p in pids if cpu_seconds(p) - base[p] > 0.3), None)
            assert busy is not None, "no replica started the long request"
            os.kill(busy, signal.SIGKILL)
            with pytest.raises(openai.InternalServerError, match="replica serving this request stopped") as failed:
                pending.result(timeout=60)
        assert failed.value.status_code == 503 and failed.value.response.headers["retry-after"] == "1"
        assert ask(cmd.url, REQUESTS[1])[0] == expected[1]  # still served
        cmd.ready(2, 90)

        code, err = cmd.stop()
        assert code == 0, err[-3000:]
        assert "deleting the deployment" in err and "Traceback" not in err
        with pytest.raises(httpx.TransportError):
            httpx.get(cmd.url + "/health", timeout=2)  # the local cluster went with it
    finally:
        cmd.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- joining a cluster that lives on --------------------------------------------------------------------------------
def test_joining_a_cluster_deploys_and_removes_only_the_deployment(folder: Path, tmp_path: Path) -> None:
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_bin, "the ray extra's command is missing"
    gcs = free_port()
    head = [ray_bin, "start", "--head", "--num-cpus", "1", "--port", str(gcs), "--include-dashboard", "false"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(head, check=True, capture_output=True, timeout=120, env=env)
    # `ray start` turned token authentication on; Ray sends the token to an explicit address only in token mode
    env["RAY_AUTH_MODE"] = "token"
    try:
        cmd = Command(str(folder), "--ray-address", f"127.0.0.1:{gcs}", "--model-name", NAME, env=env)
        try:
            health = cmd.ready(1)
            text, _ = ask(cmd.url, REQUESTS[6])
            assert text == ask_single(folder, REQUESTS[6])
            assert health["deployment"]["application"] == "RUNNING"
            code, err = cmd.stop()
            assert code == 0, err[-3000:]
            assert "joined cluster" in err
        finally:
            cmd.kill()
        # the cluster and its Serve proxy live on; the application is gone, and the proxy says so in OpenAI's body
        r = httpx.get(cmd.url + "/v1/models", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        probe = (
            "import ray, sys\nfrom ray import serve\n"
            f"ray.init(address='127.0.0.1:{gcs}', logging_level='error')\n"
            "print(sorted(serve.status().applications))"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)


def ask_single(folder: Path, req: dict[str, Any]) -> str:
    with Running(create_app(er.Model.load(folder, threads=1), Settings(NAME))) as srv:
        return ask(srv.url, req)[0]
