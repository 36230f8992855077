"""edgeroute's server as a Ray Serve deployment: replicas of the same OpenAI app behind one endpoint (the ``ray``
extra, ``pip install 'edgeroute[ray]'``).

>>> from edgeroute.serve import Settings                                                     # doctest: +SKIP
>>> from edgeroute.serve.ray import start
>>> service = start("models/smollm2-135m", Settings("smollm2"), replicas=2)  # a local Ray cluster
>>> service.url, service.status()["replica_states"]
('http://127.0.0.1:8000', {'RUNNING': 2})
>>> service.stop()

Each replica is an actor that loads the exported folder (the path must exist on every node that runs one) and
serves :func:`edgeroute.serve.create_app`'s routes through Ray Serve's ASGI ingress: the same requests, answers,
errors and streams as ``edgeroute serve``, each replica with its own engine (``max_batch`` slots). Ray's HTTP
proxy routes each request to a replica that has room (``max_ongoing_requests``: by default the engine's slots)
and queues at most ``max_queued_requests`` per caller before it answers 503.

What a user relies on:

* a replica that dies (its process killed, its engine stopped: :meth:`Replica.check_health`) is replaced by Ray;
  requests running on it fail with OpenAI's error body, 503 + ``Retry-After`` before their answer began, and an
  error event then ``data: [DONE]`` in a stream that was cut (:class:`~edgeroute.serve.asgi.ProxyErrors`,
  installed in Ray's proxies), while the other replicas keep serving;
* ``GET /health`` adds the replica that answered and the deployment's state (``RUNNING``, ``UPDATING``,
  ``UNHEALTHY``, replicas per state);
* :meth:`Service.stop` deletes the application (and stops the cluster if it started it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = "serving on Ray needs the ray extra: pip install 'edgeroute[ray]'"

try:
    import ray
    from ray import serve as ray_serve
except ImportError as e:  # pragma: no cover - exercised by tests/test_ray.py in a subprocess
    raise ImportError(f"{INSTALL_HINT} ({e.name} is missing)", name=e.name) from e

import edgeroute as er  # noqa: E402
from edgeroute.errors import one_line  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from .app import Settings, create_app  # noqa: E402
from .asgi import ProxyErrors, ReplicaHeaders  # noqa: E402  (pure ASGI, importable without Ray)

APP_NAME = "edgeroute"
PROXY_CALLBACK = "edgeroute.serve.ray:proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
STATUS_TTL_S = 1.0  # /health asks the controller for the deployment's state at most this often per replica
READY_TIMEOUT_S = 300.0  # serve.run waits this long for every replica to load


class RayServeError(er.EdgerouteError, RuntimeError):
    """The Ray cluster could not be started or joined, or the deployment could not be created."""


# -- the replica ------------------------------------------------------------------------------------------------
class Replica:
    """One replica: loads the model folder (the actor is not routed to until it has) and serves the OpenAI app
    of ``edgeroute serve`` over it. Wrapped by :func:`deployment` with Ray Serve's late-bound ingress."""

    def __init__(
        self,
        folder: str,
        settings: Settings,
        provider: str = "cpu",
        threads: int | None = None,
        context_size: int | None = None,
    ) -> None:
        self.settings = settings
        self.model = er.Model.load(folder, provider=provider, threads=threads, context_size=context_size)
        context = ray_serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.deployment_name = context.deployment
        self._status: tuple[float, dict[str, Any]] = (0.0, {})
        self._status_lock = threading.Lock()
        self._starlette: Any = None  # not ``app``: Ray's ingress wrapper owns that name

    def __serve_build_asgi_app__(self) -> Any:
        # the Starlette app itself (Ray adds exception handlers to it), our headers as its outermost middleware
        app = create_app(self.model, self.settings, health=self._health)
        app.add_middleware(ReplicaHeaders, replica=self.replica_id)
        self._starlette = app
        return app

    def check_health(self) -> None:
        """Ray calls it every few seconds; raising marks the replica unhealthy and Ray replaces it."""
        if self._starlette is None:
            return  # the app is being built
        engine = self._starlette.state.edgeroute.engine  # None until the app's lifespan started it
        if engine is not None and not engine.alive:
            raise RuntimeError("the engine stopped")

    def _health(self) -> dict[str, Any]:
        with self._status_lock:
            at, cached = self._status
            if time.monotonic() - at > STATUS_TTL_S:
                try:
                    cached = deployment_status(self.app_name, self.deployment_name)
                except Exception as e:  # noqa: BLE001 - the controller is unreachable: say so, keep answering
                    cached = {"status": "UNKNOWN", "message": f"{type(e).__name__}: {e}"}
                self._status = (time.monotonic(), cached)
        return {"replica": {"id": self.replica_id, "pid": os.getpid()}, "deployment": cached}


def deployment_status(app_name: str = APP_NAME, deployment_name: str | None = None) -> dict[str, Any]:
    """The application's and its deployment's state from Ray Serve's controller: ``{"application", "name",
    "status", "message", "replica_states"}`` (``status`` is ``"NOT_FOUND"`` when the application is not there)."""
    apps = ray_serve.status().applications
    if app_name not in apps:
        return {"application": "NOT_FOUND", "name": deployment_name, "status": "NOT_FOUND", "replica_states": {}}
    app = apps[app_name]
    deployments = app.deployments
    name = deployment_name if deployment_name in deployments else next(iter(deployments), None)
    d = deployments.get(name) if name is not None else None
    return {
        "application": _name(app.status),
        "name": name,
        "status": _name(d.status) if d else "NOT_FOUND",
        "message": d.message if d else app.message,
        "replica_states": {_name(k): n for k, n in (d.replica_states if d else {}).items()},
    }


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))  # Ray's status enums, as their names


def deployment(
    model: str | Path,
    settings: Settings,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    threads: int | None = None,
    provider: str = "cpu",
    context_size: int | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    autoscaling_config: Mapping[str, Any] | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
    name: str = "EdgerouteServer",
) -> Any:
    """The bound Ray Serve application (``serve.run`` it, or compose it): ``replicas`` actors of :class:`Replica`
    with ``cpus_per_replica`` CPUs each (and one GPU each on ``provider="cuda"``), ``threads`` onnxruntime threads
    each (default: the CPUs, rounded up). ``max_ongoing_requests`` defaults to the engine's slots
    (``settings.max_batch``) and ``max_queued_requests`` to its queue (``settings.max_queue``).
    ``autoscaling_config`` is Ray Serve's (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...):
    it replaces the fixed ``replicas``."""
    folder = Path(model).resolve()
    er.Manifest.load(folder)  # a missing or broken folder is the caller's error now, not a replica that fails
    if replicas < 1:
        raise er.ConfigError("replicas", replicas, "must be at least 1")
    if cpus_per_replica <= 0:
        raise er.ConfigError("cpus_per_replica", cpus_per_replica, "must be positive")
    actor = {"num_cpus": cpus_per_replica, **({"num_gpus": 1} if provider == "cuda" else {})}
    actor.update(ray_actor_options or {})
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": max_ongoing_requests or settings.max_batch,
        "max_queued_requests": settings.max_queue if max_queued_requests is None else max_queued_requests,
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 5,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = replicas
    cls = ray_serve.deployment(**options)(ray_serve.ingress()(Replica))
    return cls.bind(str(folder), settings, provider, threads or max(1, math.ceil(cpus_per_replica)), context_size)


# -- the proxies ------------------------------------------------------------------------------------------------
def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=edgeroute.serve.ray:proxy_middlewares``
    in the environment of the node that starts Serve): the middlewares every HTTP proxy wraps its app in."""
    return [Middleware(ProxyErrors)]


# -- starting, joining, stopping --------------------------------------------------------------------------------
@dataclass
class Service:
    """A running deployment: its URL, its state, and how to stop it."""

    url: str
    app_name: str
    started_cluster: bool
    startup_s: float
    _stopped: bool = field(default=False, repr=False)

    def status(self) -> dict[str, Any]:
        return deployment_status(self.app_name)

    def stop(self) -> None:
        """Delete the application; shut Serve and Ray down if :func:`start` started the cluster, else only
        disconnect (the cluster and its other applications live on)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            ray_serve.delete(self.app_name, _blocking=True)
        finally:
            if self.started_cluster:
                ray_serve.shutdown()
            ray.shutdown()


def start(
    model: str | Path,
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ray_cpus: int | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    app_name: str = APP_NAME,
    stop: threading.Event | None = None,
    **options: Any,
) -> Service:
    """Start a local Ray cluster (``address`` None; ``ray_cpus`` CPUs, default this machine's) or join the one at
    ``address`` (``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"``), start Serve's proxy on ``host:port`` (on
    a joined cluster whose Serve already runs, its proxy stays where it is), deploy :func:`deployment` with
    ``options``, and wait until every replica has loaded. ``stop`` set while it waits gives up: the application is
    removed again and :class:`Interrupted` raised. ``ray.init`` replaces the process's SIGINT/SIGTERM handlers
    (Ray's abort the process); the caller's are put back."""
    began = time.monotonic()
    app = deployment(model, settings, replicas=replicas, cpus_per_replica=cpus_per_replica, **options)
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # a local cluster's proxies inherit it
    started_cluster = address is None
    handlers = _signal_handlers()
    try:
        if started_cluster:
            cpus = ray_cpus if ray_cpus is not None else (os.cpu_count() or 1)
            if options.get("autoscaling_config") is None:
                hint = " (set --ray-cpus, or fewer replicas)"
                _check_cpus(replicas, cpus_per_replica, cpus, "the local cluster", hint)
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except RayServeError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's many connection errors, one line
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (
                " (a cluster started by `ray start` uses token authentication: Ray sends the token to an explicit"
                " address only with RAY_AUTH_MODE=token, and the cluster's token in ~/.ray/auth_token or"
                " $RAY_AUTH_TOKEN)"
            )
        raise RayServeError(f"could not {where}: {one_line(e)}{hint}") from e
    finally:
        _restore(handlers)
    try:
        if not started_cluster and options.get("autoscaling_config") is None:
            have = float(ray.cluster_resources().get("CPU", 0))
            _check_cpus(replicas, cpus_per_replica, have, f"the cluster at {address}")
        ray_serve.start(
            http_options={"host": host, "port": port},
            controller_options={"runtime_env": {"env_vars": {PROXY_CALLBACK_ENV: os.environ[PROXY_CALLBACK_ENV]}}},
        )
        _run(app, app_name, stop)
    except BaseException as e:
        if isinstance(e, Interrupted):
            with contextlib.suppress(Exception):
                ray_serve.delete(app_name, _blocking=True)
        if started_cluster:
            with contextlib.suppress(Exception):
                ray_serve.shutdown()
        ray.shutdown()
        if isinstance(e, (RayServeError, KeyboardInterrupt)):
            raise
        raise RayServeError(f"could not deploy {Path(model)}: {one_line(e)[:500]}") from e
    return Service(_url(host, port), app_name, started_cluster, time.monotonic() - began)


def _check_cpus(replicas: int, cpus_per_replica: float, have: float, where: str, hint: str = "") -> None:
    wanted = replicas * cpus_per_replica
    if wanted > have:
        raise RayServeError(
            f"{replicas} replicas of {cpus_per_replica:g} CPUs need {wanted:g} CPUs; {where} has {have:g}{hint}"
        )


class Interrupted(RayServeError):
    """:func:`start` was stopped (its ``stop`` event set) before the deployment was ready."""


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(handlers: dict[int, Any]) -> None:
    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)


def _run(app: Any, app_name: str, stop: threading.Event | None) -> None:
    done: list[BaseException] = []

    def run() -> None:
        try:
            ray_serve.run(app, name=app_name, route_prefix="/", blocking=False)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done.append(e)

    worker = threading.Thread(target=run, name="edgeroute-ray-deploy", daemon=True)
    worker.start()
    end = time.monotonic() + READY_TIMEOUT_S
    while worker.is_alive() and time.monotonic() < end:
        if stop is not None and stop.is_set():
            raise Interrupted("stopped before the deployment was ready")
        worker.join(0.2)
    if worker.is_alive():
        raise RayServeError(f"the replicas did not start within {READY_TIMEOUT_S:g} s (serve.status() says why)")
    if done:
        raise done[0]


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def run(
    model: str | Path,
    settings: Settings,
    announce: Callable[[str], None] = print,
    **kwargs: Any,
) -> None:
    """:func:`start`, then serve until SIGINT or SIGTERM, then :meth:`Service.stop` (the command exits 0)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            service = start(model, settings, stop=stop, **kwargs)
        except Interrupted:
            announce("edgeroute: stopped before the deployment was ready; it was removed")
            return
        try:
            state = service.status()
            announce(
                f"edgeroute: serving {settings.model_name} at {service.url} on Ray Serve: "
                f"{state['replica_states'].get('RUNNING', 0)} replicas running, started in {service.startup_s:.1f} s"
                f" ({'local cluster' if service.started_cluster else 'joined cluster'})"
            )
            while not stop.wait(0.5):
                pass
            announce("edgeroute: stopping: deleting the deployment")
        finally:
            service.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
