"""Server defaults, in one place: `python -m engine.serve` and the Ray Serve builder read `ServeConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

STATE_DIR = ".serve"  # <engine_dir>/.serve/: what the server writes (no build.json: never taken for a model)


@dataclass
class ServeConfig:
    engine_dir: Path = Path("engines")  # what python -m engine.build wrote
    model: str | None = None  # None = the only model in engine_dir
    device: str = "auto"
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 8000
    max_batch: int = 8  # images per UNet batch (capped at the engines' largest batch)
    max_wait_ms: float = 10.0  # how long the first queued request waits for batch-mates (request batching)
    batching: str = "request"  # "request": whole requests batched; "step": rows join/leave at every step
    max_queue: int = 64  # requests waiting (not yet running); one more is answered 429
    max_images: int = 8  # images per request (OpenAI's n)
    max_size: int = 2048  # pixels per side a request may ask for (the engines' profile may allow more)
    timeout_s: float = 300.0  # per request, queue + compute; past it the answer is 504
    cost_admission: bool = True  # refuse (400) what would denoise past timeout_s at this server's measured speed
    max_cost: float | None = None  # megapixel-steps (steps x megapixels x images) a request may ask for; None = any
    drain_timeout_s: float = 25.0  # SIGTERM: past it, what is left is answered 503 (k8s' grace period is 30 s)
    max_body_mb: float = 20.0  # larger bodies are answered 413
    warmup: bool = True  # one small generation before /readyz says ready
    lora_dir: Path | None = None  # LoRA .safetensors a request may name (`loras: [{name, scale}]`); None = none
    embeddings_dir: Path | None = None  # textual-inversion .safetensors prompts may name (engine/embeddings.py)
    log_level: str = "info"
    # who may talk to the server (engine/server/access.py)
    api_key: str | None = field(default=None, repr=False)  # Authorization: Bearer <key> on all but health; or env
    cors_origins: tuple[str, ...] = ()  # browser origins allowed cross-site (CORS and POST); () = none
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the loopback ones (when on loopback); "*" = any
    # connections (uvicorn): an idle or slow client cannot hold a socket, and their number is capped
    limit_concurrency: int = 1024  # open connections + running requests; past it uvicorn answers 503
    timeout_keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    max_header_kb: int = 16  # request line + headers (h11's incomplete event size); over it: 400
    # OpenAI `url` answers: PNGs hosted at GET /v1/images/files/<name> (engine/server/image_files.py)
    image_dir: Path | None = None  # None = <engine_dir>/.serve/images; never a path from a request
    image_ttl_s: float = 3600.0  # a hosted image is deleted (404) this long after it was written
    image_dir_mb: float = 1024.0  # past it, the oldest hosted images are deleted
    public_url: str | None = None  # base of the image URLs (a proxy's https://host/prefix); None = the request's
    # Ray Serve (python -m engine.serve --ray)
    ray: bool = False
    replicas: int = 1  # fixed replica count; ignored when autoscaling (max_replicas > replicas)
    max_replicas: int | None = None  # autoscaling upper bound; None = no autoscaling
    gpus_per_replica: float = 0.0  # 1 on a GPU cluster: one replica per GPU
    cpus_per_replica: float = 1.0
    # per replica, what Ray's router sends before it queues: above max_queue + max_batch, so the replica's own
    # bounded queue answers 429 (our JSON error) before Ray's router queue overflows (429 with Ray's text)
    max_ongoing_requests: int = 80

    def __post_init__(self) -> None:
        self.engine_dir = Path(self.engine_dir)
        self.cors_origins, self.allowed_hosts = tuple(self.cors_origins), tuple(self.allowed_hosts)  # Ray: lists
        self.image_dir = Path(self.image_dir) if self.image_dir is not None else None
        self.embeddings_dir = Path(self.embeddings_dir) if self.embeddings_dir is not None else None
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")

    @property
    def image_folder(self) -> Path:
        """Where hosted images are written: --image-dir, or the engine directory's state folder."""
        return self.image_dir if self.image_dir is not None else self.engine_dir / STATE_DIR / "images"


def image_hosting_problem(config: ServeConfig) -> tuple[str, str] | None:
    """(flag, why) when the image hosting settings cannot work, else None: checked by the CLI (exit 2) and by the
    Ray builder (ValueError) before anything starts."""
    if not config.image_ttl_s > 0:
        return "--image-ttl-s", f"{config.image_ttl_s} must be > 0"
    if not config.image_dir_mb > 0:
        return "--image-dir-mb", f"{config.image_dir_mb} must be > 0"
    if config.public_url is not None:
        url = urlsplit(config.public_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
            return "--public-url", f"{config.public_url!r} must be http(s)://host[:port][/prefix], without a query"
    return None
