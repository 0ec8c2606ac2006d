"""python -m engine.serve: a long-lived server that keeps the engines loaded and batches concurrent requests.

Loads the engine directory once, warms up, then serves until SIGTERM/SIGINT. The first signal drains:
/readyz answers 503, new generations 503, every accepted request is finished (those left after --drain-timeout-s
are answered 503 and their batch stops at its next step), then the process exits 0.
A second signal stops at once (uvicorn's graceful shutdown, then forced). --ray deploys the same app on
Ray Serve instead (engine/server/ray_app.py).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from types import FrameType

from engine.server.config import STATE_DIR, ServeConfig, image_hosting_problem

log = logging.getLogger("engine.serve")
API_KEY_ENV = "SD_ENGINE_API_KEY"  # the API key without putting it on the command line (ps shows argv)


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir, help="what python -m engine.build wrote")
    p.add_argument("--model", default=d.model, help="model id, preset or path given to engine.build; "
                   "None = the only model in --engine-dir")
    p.add_argument("--device", default=d.device, help="torch / onnxruntime device: auto, cpu, cuda, cuda:1")
    p.add_argument("--host", default=d.host, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="images per UNet batch (capped at the engines' largest batch)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long the first queued request waits for compatible batch-mates")
    p.add_argument("--batching", choices=("request", "step"), default=d.batching,
                   help="request: whole requests batched together; step: rows join and leave the running batch at "
                   "every denoising step (continuous batching)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting; one more gets 429")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request (OpenAI's n)")
    p.add_argument("--max-size", type=int, default=d.max_size,
                   help="largest height or width a request may ask for, in pixels (within the engines' profile)")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per request, queue + compute; then 504")
    p.add_argument("--cost-admission", action=argparse.BooleanOptionalAction, default=d.cost_admission,
                   help="refuse (400) a request whose denoising would take longer than --timeout-s at the speed this "
                   "server measured (warm-up and every batch)")
    p.add_argument("--max-cost", type=float, default=d.max_cost,
                   help="megapixel-steps (steps x megapixels x images) one request may ask for; None = no cap")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                   help="on SIGTERM, how long accepted requests may still run; then they get 503 and the server exits")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="larger request bodies get 413")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=d.warmup,
                   help="one small generation before /readyz says ready")
    p.add_argument("--lora-dir", type=Path, default=d.lora_dir,
                   help="folder of LoRA .safetensors that requests may name (by file stem) in `loras`")
    p.add_argument("--embeddings-dir", type=Path, default=d.embeddings_dir,
                   help="folder of textual-inversion embeddings (.safetensors) that prompts use by file stem")
    p.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error"))
    access = p.add_argument_group("access (engine/server/access.py)")
    access.add_argument("--api-key", default=argparse.SUPPRESS,
                        help=f"require 'Authorization: Bearer KEY' on every route but /healthz and /readyz "
                        f"(or set {API_KEY_ENV}); default: no key")
    access.add_argument("--cors-origin", dest="cors_origins", action="append", default=list(d.cors_origins),
                        metavar="ORIGIN", help="a browser origin (https://app.example) allowed to call the server "
                        "cross-site; repeatable; none = CORS off and cross-site POSTs refused")
    access.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=list(d.allowed_hosts),
                        metavar="NAME", help="a Host header name to answer besides the loopback names (which alone "
                        "are allowed when --host is loopback); repeatable; '*' = any")
    hosted = p.add_argument_group("OpenAI url answers (engine/server/image_files.py)")
    hosted.add_argument("--image-dir", type=Path, default=d.image_dir,
                        help=f"folder of the hosted images; None = <engine-dir>/{STATE_DIR}/images")
    hosted.add_argument("--image-ttl-s", type=float, default=d.image_ttl_s,
                        help="a hosted image is deleted (its URL answers 404) this long after it was generated")
    hosted.add_argument("--image-dir-mb", type=float, default=d.image_dir_mb,
                        help="past this size the oldest hosted images are deleted")
    hosted.add_argument("--public-url", default=d.public_url,
                        help="base of the image URLs (https://host[/prefix] of a proxy); None = the scheme and "
                        "Host of each request")
    conn = p.add_argument_group("connections (uvicorn)")
    conn.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                      help="open connections + running requests; past it new requests get 503")
    conn.add_argument("--timeout-keep-alive-s", type=int, default=d.timeout_keep_alive_s,
                      help="an idle keep-alive connection is closed after this")
    conn.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                      help="a connection whose request line and headers are not complete by then is closed")
    conn.add_argument("--max-header-kb", type=int, default=d.max_header_kb,
                      help="largest request line + headers; larger gets 400")
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", default=d.ray, help="deploy on Ray Serve (local instance)")
    ray.add_argument("--replicas", type=int, default=d.replicas, help="replicas (the minimum when autoscaling)")
    ray.add_argument("--max-replicas", type=int, default=d.max_replicas,
                     help="autoscale up to this many replicas; None = a fixed --replicas")
    ray.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica,
                     help="1 on a GPU cluster: one replica per GPU")
    ray.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica, help="CPUs each replica reserves")
    ray.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                     help="requests Ray's router sends one replica at a time")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_images", "max_size", "replicas", "max_ongoing_requests",
                 "limit_concurrency", "timeout_keep_alive_s", "max_header_kb"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.max_cost is not None and not args.max_cost > 0:
        p.error(f"argument --max-cost: {args.max_cost} must be > 0")
    for name in ("max_wait_ms", "timeout_s", "drain_timeout_s", "max_body_mb", "header_timeout_s"):
        if not getattr(args, name) > 0 and not (name == "max_wait_ms" and args.max_wait_ms == 0):
            p.error(f"argument --{name.replace('_', '-')}: {getattr(args, name)} must be > 0")
    if not 0 < args.port < 65536:
        p.error(f"argument --port: {args.port} must be in [1, 65535]")
    args.api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or d.api_key
    if args.api_key is not None and not args.api_key.strip():
        p.error("argument --api-key: the key is empty")
    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
    problem = image_hosting_problem(cfg)
    if problem is None and cfg.image_dir is not None:
        from engine.server.image_files import folder_problem

        problem = ("--image-dir", reason) if (reason := folder_problem(cfg.image_dir)) else None
    if problem is not None:
        p.error(f"argument {problem[0]}: {problem[1]}")
    return cfg


def _make_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains the app before the usual graceful shutdown."""

        def __init__(self, config: uvicorn.Config, state):
            super().__init__(config)
            self.state = state
            self.draining = False
            self.loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            watch = self.loop.create_task(self._exit_if_load_fails())
            try:
                await super().serve(sockets)
            finally:
                watch.cancel()

        async def _exit_if_load_fails(self) -> None:
            """The engines load after the port opened (engine/server/app.py); a load that fails ends the process."""
            await self.state.settled.wait()
            if self.state.status == "failed":
                self.should_exit = True

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not uvicorn's handler: that one re-raises the signal after shutdown, so a drained exit would
            # still die by SIGTERM instead of returning 0.
            if self.draining or self.loop is None:
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            self.draining = True
            log.info("signal %s: draining (no new work; finishing %s queued request(s))", sig,
                     self.state.batcher.depth if self.state.batcher else 0)
            self.loop.call_soon_threadsafe(self._drain)

        def _drain(self) -> None:
            async def drain_then_exit() -> None:
                await self.state.drain_within(self.state.config.drain_timeout_s)
                log.info("drained: every accepted request answered; shutting down")
                self.should_exit = True

            assert self.loop is not None
            self.loop.create_task(drain_then_exit())

    return DrainingServer


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.ray:
        from engine.server.ray_app import run

        try:
            run(cfg)
        except (ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from engine.pipeline import find_model_dir
    from engine.server.connections import listen_socket

    try:  # what can be told before anything loads: one line, exit 2 (as engine.generate)
        find_model_dir(cfg.engine_dir, cfg.model)
        if cfg.embeddings_dir is not None and not cfg.embeddings_dir.is_dir():
            raise ValueError(f"--embeddings-dir {cfg.embeddings_dir} is not a folder")
        sock = listen_socket(cfg.host, cfg.port)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from engine.server.app import create_app
    from engine.server.connections import uvicorn_options

    app = create_app(cfg)
    server = _make_server_class()(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                                 timeout_graceful_shutdown=None, access_log=False,
                                                 **uvicorn_options(cfg)),
                                  app.state.server)
    with sock:
        server.run(sockets=[sock])
    if app.state.server.status == "failed" and app.state.server.pipeline is None:  # the engines did not load
        print(f"error: {app.state.server.error}", file=sys.stderr)
        return 2
    if not server.started:
        print("error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
