"""The server app (`engine.server.app.create_app`) deployed on Ray Serve: one replica per GPU or per CPU group.

    python -m engine.serve --engine-dir DIR --ray --replicas 2          # local Ray, this machine
    serve deploy engine/server/serve_config.yaml                        # a running Ray cluster / KubeRay

`build_app(config)` returns the Serve application (one deployment, `SDServer`, whose replicas each run the
whole FastAPI app: routes, batcher, metrics); `app_builder(args)` is the same for a Serve config file's
`import_path` (args are `ServeConfig` field names); `run(config)` starts Serve locally, deploys, and serves
until SIGTERM/SIGINT. Ray's HTTP proxy routes each request to a replica; nothing here routes or does RPC.

Replicas. `ray_actor_options` = {num_gpus: gpus_per_replica, num_cpus: cpus_per_replica}: with
`gpus_per_replica=1` Ray places one replica per GPU (each sees only its own GPU). `num_replicas` = `replicas`,
or, when `max_replicas > replicas`, an autoscaling range [replicas, max_replicas] (Ray's default target of
ongoing requests per replica, raised to `max_batch` so a replica is only "busy" once it could fill a batch).

The app is built inside each replica (`serve.ingress(builder)`: Serve calls the builder at replica start), not
pickled from the driver; the app's `engine.*` loggers write to the replica's Serve log. Ray Serve runs the ASGI
lifespan in the replica (uvicorn's LifespanOn: startup before the replica takes traffic, shutdown from the
replica's `__del__`), so the app's own lifespan loads the Pipeline, starts the batcher and warms up, and on
shutdown drains (verified: tests/test_serve_ray.py). The app is wrapped in a thin ASGI layer that
  * holds lifespan startup until `app.state.server` is ready (engines loaded, warm-up done) or failed, so Ray
    neither marks a replica RUNNING nor routes to it while it would answer 503 "loading" (a failed load fails
    the replica's start, and Ray retries it), and
  * adds the header `X-Replica: <Serve replica id>` to every response (which replica answered).
Stopping a replica (scale-down, redeploy, `serve.delete`, `run`'s SIGTERM): Ray stops routing to it, waits up
to `graceful_shutdown_timeout_s` (= timeout_s) for its ongoing requests, then the lifespan shutdown drains.

Backpressure, and why every overload answer is a 429 with Retry-After:
  * Ray's proxy sends a replica at most `max_ongoing_requests` requests at once; the rest wait in the proxy's
    router queue. With Ray's default (`max_queued_requests=-1`) that queue is unbounded: an overloaded
    deployment would make clients wait without limit, and with `max_ongoing_requests` below the replica's
    own queue (`max_queue`) the replica's 429 never fires. Past `max_queued_requests`, Ray's router raises
    BackPressureError, which its proxy answers 503 by default (no Retry-After); since Ray 2.58 a deployment
    can choose the status (`backpressure_config.status_code`: 503 or 429) and a `Retry-After` header.
  * Chosen: `max_queued_requests = max_queue` (per proxy, i.e. per node) with
    `backpressure_config = {status_code: 429, retry_after_s: RETRY_AFTER_S}`, so Ray's own backpressure is a
    429 with Retry-After, like the replica's. Whichever layer is full first answers 429: the replica's bounded
    queue (the default: `max_ongoing_requests=80` > max_queue + max_batch = 72) with our JSON error body, or
    Ray's router queue (when `max_ongoing_requests` is set below that) with Ray's text body
    "Request dropped due to backpressure ...". Status and header are what clients act on; the body differs.
    On Ray < 2.58 (no backpressure_config) the router's overflow stays Ray's 503, and a warning says so.
  * Other proxy answers: 503 when no replica is available (deploy failed / all replicas gone), 408 only if
    `http_options.request_timeout_s` is set (it is not: the app's own `timeout_s` answers 504), 499 is logged
    when a client disconnects (the request is cancelled in the replica).

Metrics: `/metrics` is per replica (each replica process has its own registry; `X-Replica` says which
answered); Ray's own `ray_serve_*` metrics come from Ray's metrics export on each node.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from engine.server.config import ServeConfig, image_hosting_problem

log = logging.getLogger("engine.server.ray_app")

APP_NAME = "sd"  # the Serve application's name (serve status, serve.delete)
DEPLOYMENT_NAME = "SDServer"
RETRY_AFTER_S = 1.0  # Retry-After on Ray's backpressure 429
REPLICA_HEADER = b"x-replica"
READY_POLL_S = 0.05


def _replica_tag() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_tag
    except RayServeException:  # not in a replica (e.g. serve's local testing mode)
        return f"pid{os.getpid()}"


def _server_failure(server: Any) -> str | None:
    """Why the server state says it cannot become ready (load or warm-up failed), or None."""
    if server.status in ("failed", "draining"):
        return server.error or server.status
    return None


class ReplicaASGI:
    """The FastAPI app, as a replica serves it: lifespan startup held until ready; X-Replica on responses."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def wait_ready(self) -> str | None:
        """None once the app's server state is ready; the failure message if it failed instead."""
        server = self.app.state.server
        while not server.ready:
            failure = _server_failure(server)
            if failure:
                return failure
            await asyncio.sleep(READY_POLL_S)
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            async def lifespan_send(message):
                if message["type"] == "lifespan.startup.complete":
                    failure = await self.wait_ready()
                    if failure:
                        message = {"type": "lifespan.startup.failed", "message": f"server not ready: {failure}"}
                    else:
                        log.info("replica %s ready", self.replica.decode())
                elif message["type"] == "lifespan.shutdown.complete":
                    log.info("replica %s drained and stopped", self.replica.decode())
                await send(message)

            return await self.app(scope, receive, lifespan_send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def http_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)]}
            await send(message)

        return await self.app(scope, receive, http_send)


def _route_logs_to_replica_log(level: str) -> None:
    """The app's loggers (engine.*) write where the replica's own log goes (Serve's replica log file, with the
    replica's id, and stderr when RAY_SERVE_LOG_TO_STDERR): Serve configures only its own "ray.serve" logger."""
    serve_logger = logging.getLogger("ray.serve")
    engine_logger = logging.getLogger("engine")
    engine_logger.setLevel(level.upper())
    if serve_logger.handlers:
        engine_logger.handlers[:] = serve_logger.handlers
        engine_logger.propagate = False


def _deployment(config: ServeConfig):
    """The `SDServer` deployment for `config` (options not yet applied)."""
    from ray import serve

    fields = _config_dict(config)  # plain values, pickled with the builder

    def build_asgi_app():  # Serve calls this in each replica, at replica start
        from engine.pipeline import find_model_dir
        from engine.server.app import create_app

        replica_config = ServeConfig(**fields)
        # a missing engine directory or model fails here, by name (a failing lifespan only says "startup failed")
        find_model_dir(replica_config.engine_dir, replica_config.model)
        _route_logs_to_replica_log(replica_config.log_level)
        return ReplicaASGI(create_app(replica_config), _replica_tag())

    @serve.ingress(build_asgi_app)
    class SDServer:
        """One replica: the whole server app (engines, batcher, metrics) in one Ray actor."""

    return serve.deployment(SDServer, name=DEPLOYMENT_NAME)


def _ray_has_backpressure_config() -> bool:
    import ray.serve.config

    return hasattr(ray.serve.config, "BackpressureConfig")  # Ray >= 2.58


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """The Serve deployment options `build_app` uses for `config` (see the module docstring)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queue,
        # a stopping replica first finishes what it accepted (each request is bounded by timeout_s)
        "graceful_shutdown_timeout_s": config.timeout_s,
    }
    if _ray_has_backpressure_config():
        options["backpressure_config"] = {"status_code": 429, "retry_after_s": RETRY_AFTER_S}
    else:
        log.warning("this Ray Serve has no backpressure_config (Ray < 2.58): its router's overflow is a 503 "
                    "without Retry-After; upgrade ray[serve] for a 429")
    if config.max_replicas is not None and config.max_replicas > config.replicas:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas,
            "initial_replicas": config.replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": max(1, min(config.max_batch, config.max_ongoing_requests)),
        }
    else:
        options["num_replicas"] = config.replicas
    return options


def _validate(config: ServeConfig) -> None:
    if config.replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {config.replicas}")
    if config.max_replicas is not None and config.max_replicas < config.replicas:
        raise ValueError(f"max_replicas ({config.max_replicas}) must be >= replicas ({config.replicas})")
    if config.gpus_per_replica < 0 or config.cpus_per_replica < 0:
        raise ValueError("gpus_per_replica and cpus_per_replica must be >= 0")
    if config.max_ongoing_requests < 1:
        raise ValueError(f"max_ongoing_requests must be >= 1, got {config.max_ongoing_requests}")
    problem = image_hosting_problem(config)
    if problem is not None:
        raise ValueError(f"{problem[0].removeprefix('--').replace('-', '_')}: {problem[1]}")


def _config_dict(config: ServeConfig) -> dict[str, Any]:
    """ServeConfig as plain JSON-able values (what the replicas rebuild it from)."""
    out = dataclasses.asdict(config)
    out["engine_dir"] = str(config.engine_dir)
    return out


def build_app(config: ServeConfig):
    """The Serve application (`serve.run(build_app(config))`): `SDServer` with `config`'s replica settings."""
    _validate(config)
    return _deployment(config).options(**deployment_options(config)).bind()


def app_builder(args: dict[str, Any]):
    """Serve config file entry point (`import_path: engine.server.ray_app:app_builder`); args = ServeConfig fields."""
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown ServeConfig field(s) in args: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    return build_app(ServeConfig(**args))


class _Interrupted(Exception):
    pass


def _deploy_failure(exc: Exception) -> str:
    """The deployment's own status message (it names the replica's exception) where Serve has one."""
    from ray import serve

    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except (KeyError, AttributeError, RuntimeError, ConnectionError) as status_error:  # Serve has no status for it
        log.debug("no deployment status to explain %r: %r", exc, status_error)
        message = ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)  # the replica's traceback ends with its exception
    if "lifespan startup failed" in last:  # the app's own error is in the replica's log, not in Serve's status
        last += " (the replica's log names the cause: the (ServeReplica ...) lines above, or logs/serve/ " \
                "in the Ray session directory)"
    return last


def run(config: ServeConfig) -> None:
    """Start Ray (local, or the cluster in RAY_ADDRESS) and Serve's HTTP proxy on config.host:config.port, deploy,
    serve until SIGTERM/SIGINT, then stop: replicas finish accepted requests, and a Ray started here is shut down."""
    import ray
    from ray import serve

    from engine.pipeline import find_model_dir

    _validate(config)
    app = build_app(config)
    if not os.environ.get("RAY_ADDRESS"):
        find_model_dir(config.engine_dir, config.model)  # fail before starting Ray: ValueError naming the problem
    stop = threading.Event()
    deployed = threading.Event()

    def on_signal(signum, _frame):
        again = stop.is_set()
        log.info("signal %s: %s", signal.Signals(signum).name, "stopping at once" if again else "stopping")
        stop.set()
        if again or not deployed.is_set():
            raise _Interrupted()

    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():  # a new local Ray, unless RAY_ADDRESS names a cluster to join
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=config.log_level.upper())
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            try:
                serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as exc:  # a replica could not start (e.g. the engines do not load)
                raise RuntimeError(f"Ray Serve could not deploy {APP_NAME!r}: {_deploy_failure(exc)}") from None
            deployed.set()
            log.info("serving on http://%s:%d (Ray Serve application %r)", config.host, config.port, APP_NAME)
            while not stop.wait(1.0):
                pass
        except _Interrupted:
            pass
        deployed.set()
        try:
            serve.delete(APP_NAME)  # graceful: replicas finish their accepted requests, then drain
        except _Interrupted:  # a second signal: Ray's shutdown below stops the replicas at once
            pass
        if own_ray:
            serve.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_ray:
            ray.shutdown()
