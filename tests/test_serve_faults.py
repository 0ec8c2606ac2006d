"""Backpressure and faults of python -m engine.serve: 429 with Retry-After, 504, disconnects, failing batches, drain.

Each fault is produced for real (a full queue, a request longer than --timeout-s, a socket closed while
queued, SIGTERM with requests in flight), except NaN: no tiny model makes one on demand, so that test
swaps the loaded pipeline's VAE decoder for one that returns NaN (a fault injection, in process).
"""
from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time

import pytest

from tests.helpers import Wrapped, free_port, http, metric, running_server, wait_for_metric, wait_until

TIMEOUT_S = 5.0  # 1.0 let a FAST request queued behind two others time out on a contended machine; 3.0, the
# 100-step blocker of the disconnect test (~1 s alone) beside another worker's engine build (CI, 2026-12-04)
FAST = {"steps": 10}  # ~0.1 s on tiny at 64x64 on this CPU
SLOW = {"steps": 1000, "sampler": "euler"}  # ~10 s: far past TIMEOUT_S


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    # without cost admission, which would refuse SLOW up front: these tests need it to run into the timeout
    flags = ("--max-batch", "1", "--max-queue", "2", "--max-wait-ms", "0", "--timeout-s", str(TIMEOUT_S),
             "--no-cost-admission")
    with running_server(ort_engines, tmp_path_factory.mktemp("faults"), *flags) as s:
        yield s


def concurrently(n: int, send) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        t0 = time.perf_counter()
        results[i] = (*send(i), time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_full_queue_answers_429_with_retry_after_at_once(server):
    results = concurrently(10, lambda i: server.post("/v1/generate", {"prompt": f"p{i}", "seed": i, **FAST}))
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 3, statuses
    for status, body, headers, seconds in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(body)["error"]["type"] == "rate_limit_exceeded"
            assert seconds < 0.5, f"429 took {seconds:.3f} s"
    assert metric(server, 'sd_inference_request_failure_total{reason="queue_full"}') == statuses.count(429)


def test_an_upload_is_not_decoded_while_the_queue_is_full(server):
    """Admission before decoding: with the queue full, a request carrying an image is a 429 without its image being
    decoded (an undecodable one shows it: before the fix it was a 400 for its image, decoded first)."""
    blockers = [threading.Thread(target=server.post, args=("/v1/generate", {"prompt": f"b{i}", **SLOW}))
                for i in range(3)]  # one running, two queued (--max-queue 2): each ends by its 504
    blockers[0].start()
    wait_for_metric(server, "sd_inference_pending_request_count", 0)
    for blocker in blockers[1:]:
        blocker.start()
    wait_for_metric(server, "sd_inference_pending_request_count", 2, timeout_s=5)
    status, body, headers = server.post("/v1/generate", {"prompt": "x", "init_image": "not base64 at all!", **FAST})
    assert status == 429 and int(headers["retry-after"]) >= 1, body
    for blocker in blockers:
        blocker.join(timeout=60)
    # a barrier (one batch at a time, in arrival order): the blockers' stopped batches are counted before the next test
    assert server.post("/v1/generate", {"prompt": "after", **FAST})[0] == 200


def test_client_that_disconnects_while_queued_is_dropped(server):
    images_before = metric(server, "sd_inference_count_total")
    batches_before = metric(server, "sd_inference_exec_count_total")
    answers: list[int] = []
    blocker = threading.Thread(target=lambda: answers.append(
        server.post("/v1/generate", {"prompt": "blocker", "steps": 100})[0]))
    blocker.start()  # 100 steps (~1 s): running when the second client comes and goes, done well before --timeout-s
    wait_for_metric(server, "sd_inference_pending_request_count", 0)
    time.sleep(0.1)  # the blocker is running now
    body = json.dumps({"prompt": "gone", "steps": 7}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for_metric(server, "sd_inference_pending_request_count", 1, timeout_s=5)
    wait_for_metric(server, 'sd_inference_request_failure_total{reason="client_disconnected"}', 1, timeout_s=10)
    assert metric(server, "sd_inference_pending_request_count") == 0  # left the queue at once
    wait_for_metric(server, "sd_inference_exec_count_total", batches_before + 1)
    blocker.join(timeout=60)
    assert answers == [200]  # the blocker ran to its end (not into the timeout): its image counts below
    assert metric(server, "sd_inference_exec_count_total") == batches_before + 1
    # a barrier: one batch at a time, in arrival order, so had the dropped request still been anywhere in the
    # server it would have run before this one answered
    assert server.post("/v1/generate", {"prompt": "after", **FAST})[0] == 200
    assert metric(server, "sd_inference_exec_count_total") == batches_before + 2  # the dropped one never ran
    assert metric(server, "sd_inference_count_total") == images_before + 2


def test_request_past_its_timeout_is_504_and_its_batch_stops(server):
    batches = metric(server, "sd_inference_exec_count_total")
    stopped = metric(server, "sd_inference_stopped_count_total")
    status, body, _ = server.post("/v1/generate", {"prompt": "long", **SLOW})
    assert status == 504 and "--timeout-s" in json.loads(body)["error"]["message"]
    # nobody waits for it any more: its batch stops at the next step instead of running out its 1000 steps
    wait_for_metric(server, "sd_inference_stopped_count_total", stopped + 1, timeout_s=10)
    assert metric(server, "sd_inference_exec_count_total") == batches + 1
    status, _, _ = server.post("/v1/generate", {"prompt": "after", **FAST})
    assert status == 200


def test_a_request_that_cannot_finish_in_time_is_refused_at_once(ort_engines, tmp_path):
    """Cost admission (engine/server/admission.py): the warm-up measured this server's speed, so SLOW (about 10 s of
    denoising) is a 400 naming steps at once under --timeout-s 5, not a 504 after 5 s; --max-cost caps the
    megapixel-steps of a request whatever the speed."""
    with running_server(ort_engines, tmp_path, "--timeout-s", str(TIMEOUT_S), "--max-cost", "50") as s:
        t0 = time.perf_counter()
        status, body, _ = s.post("/v1/generate", {"prompt": "long", **SLOW})
        elapsed = time.perf_counter() - t0
        error = json.loads(body)["error"]
        assert status == 400 and error["param"] == "steps" and "would denoise for about" in error["message"], error
        assert elapsed < TIMEOUT_S / 2, f"the refusal took {elapsed:.2f} s"
        assert s.post("/v1/generate", {"prompt": "short", **FAST})[0] == 200
        status, body, _ = s.post("/v1/generate", {"prompt": "big", "steps": 50, "height": 1024, "width": 1024})
        error = json.loads(body)["error"]  # 1024 x 1024 x 50 steps = 52.4 megapixel-steps
        assert status == 400 and error["param"] == "steps" and "--max-cost 50" in error["message"], error


@pytest.mark.parametrize("batching", ["request", "step"])
def test_drain_past_its_timeout_answers_503_and_exits_without_finishing(ort_engines, tmp_path, batching):
    """A 1000-step request (about 10 s alone here) running at SIGTERM: past --drain-timeout-s 1 its client gets 503
    and the process exits 0 well before the request could have finished (before the fix it waited it out)."""
    flags = ("--max-batch", "1", "--max-wait-ms", "0", "--drain-timeout-s", "1", "--batching", batching)
    with running_server(ort_engines, tmp_path, *flags) as s:
        answer: list = []
        sender = threading.Thread(target=lambda: answer.append(s.post(
            "/v1/generate", {"prompt": "long", "steps": 1000, "sampler": "euler"})))
        sender.start()
        wait_for_metric(s, "sd_inference_pending_request_count", 0)
        time.sleep(0.3)  # running now
        t0 = time.perf_counter()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0, s.output()
        exit_s = time.perf_counter() - t0
        sender.join(timeout=30)
    assert answer and answer[0][0] == 503, answer
    assert "--drain-timeout-s 1" in json.loads(answer[0][1])["error"]["message"]
    assert exit_s < 6, f"the drain took {exit_s:.1f} s with --drain-timeout-s 1"
    assert "drain passed --drain-timeout-s 1" in s.output()


def test_nan_fails_only_its_batch_with_a_500_naming_the_cause(ort_engines):
    import uvicorn

    from engine.server.app import create_app
    from engine.server.config import ServeConfig

    app = create_app(ServeConfig(engine_dir=ort_engines, max_wait_ms=0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert thread.is_alive(), "in-process server stopped before it was ready"
            return _listening(port) and http("GET", url + "/readyz", None, 5)[0] == 200

        wait_until(ready, 120, "in-process server never became ready")
        state = app.state.server
        poisoned = {"on": True}

        def nan_when_poisoned(runner, **inputs):
            out = runner(**inputs)
            return {k: v * math.nan for k, v in out.items()} if poisoned["on"] else out

        state.pipeline.runners["vae_decoder"] = Wrapped(state.pipeline.runners["vae_decoder"], nan_when_poisoned)
        body = json.dumps({"prompt": "x", "steps": 3}).encode()
        status, answer, _ = http("POST", url + "/v1/generate", body, 60)
        error = json.loads(answer)["error"]
        assert status == 500 and "vae_decoder produced NaN/Inf" in error["message"], error
        poisoned["on"] = False
        status, _, _ = http("POST", url + "/v1/generate", body, 60)
        assert status == 200
        assert http("GET", url + "/readyz", None, 5)[0] == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_drains_every_accepted_request_then_exits_zero(ort_engines, tmp_path):
    flags = ("--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "16")
    with running_server(ort_engines, tmp_path, *flags) as s:
        results: list = []

        def send(i: int) -> None:
            results.append(s.post("/v1/generate", {"prompt": f"drain {i}", "seed": i, "steps": 150})[0])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        # all six accepted before SIGTERM: one running (max-batch 1, long enough that none finishes first), five
        # queued; waiting for fewer let a slow sixth client arrive after the drain began and get 503
        wait_for_metric(s, "sd_inference_pending_request_count", 5, timeout_s=30)
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: s.get("/readyz")[0] == 503, 10, "readyz never turned 503 while draining")
        status, body, _ = s.post("/v1/generate", {"prompt": "too late", "steps": 2})
        assert status == 503 and "draining" in json.loads(body)["error"]["message"]
        for t in threads:
            t.join(timeout=60)
        assert s.proc.wait(timeout=60) == 0, s.output()
    assert sorted(results) == [200] * 6, results
    assert "drained" in s.output()
