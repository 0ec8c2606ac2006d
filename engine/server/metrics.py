"""Prometheus metrics of one server process, named like Triton's `nv_inference_*` where the concept matches.

Triton counts requests (success / failure), inferences (images) and executions (batches run), and times
queue and compute per request; we do the same under the `sd_` prefix, as histograms in seconds (the
Prometheus convention) rather than Triton's cumulative microsecond counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
disable_created_metrics()  # no `_created` series: they double the output and no dashboard reads them
STAGES = ("clip", "encode", "unet", "vae")  # Pipeline timings_ms keys, one observation per batch


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("sd_http_requests", "HTTP answers by route and status", ["path", "status"],
                                     registry=r)
        self.success = Counter("sd_inference_request_success", "generation requests answered with images", registry=r)
        self.failure = Counter("sd_inference_request_failure", "generation requests not answered with images",
                               ["reason"], registry=r)
        self.images = Counter("sd_inference_count", "images generated", registry=r)
        self.executions = Counter("sd_inference_exec_count", "batches run (one UNet batch size each)", registry=r)
        self.stopped = Counter("sd_inference_stopped_count", "batches stopped between steps: nobody waited for "
                               "them any more (timeout, disconnect, drain past --drain-timeout-s)", registry=r)
        self.pending = Gauge("sd_inference_pending_request_count", "requests queued, not yet running", registry=r)
        self.batch_size = Histogram("sd_inference_batch_size", "images per batch run", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_time = Histogram("sd_inference_queue_duration_seconds", "time a request waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("sd_inference_compute_duration_seconds", "time the batch of a request ran",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.request_time = Histogram("sd_inference_request_duration_seconds",
                                      "arrival to answer of a generation request", buckets=LATENCY_BUCKETS, registry=r)
        self.stage_time = Histogram("sd_inference_stage_duration_seconds", "per-batch time of a pipeline stage",
                                    ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        # images hosted for OpenAI `url` answers (--image-dir), as of the last sweep
        self.hosted_files = Gauge("sd_hosted_images", "images hosted under --image-dir", registry=r)
        self.hosted_bytes = Gauge("sd_hosted_image_bytes", "bytes of the images hosted under --image-dir",
                                  registry=r)
        self.hosted_removed = Counter("sd_hosted_images_removed", "hosted images deleted, by reason "
                                      "(expired: --image-ttl-s; over_size: --image-dir-mb)", ["reason"], registry=r)

    def observe_batch(self, images: int, timings_ms: dict[str, float]) -> None:
        self.executions.inc()
        self.images.inc(images)
        self.batch_size.observe(images)
        for stage in STAGES:
            if stage in timings_ms:
                self.stage_time.labels(stage).observe(timings_ms[stage] / 1e3)

    def text(self) -> bytes:
        return generate_latest(self.registry)
