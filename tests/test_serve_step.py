"""python -m engine.serve --batching step: requests with different step counts share UNet steps, each image the
library's image of the same request run alone; backpressure, cancellation and drain hold as with request batching.
Oracle: `Pipeline.run` in this process on the same engine directory."""
from __future__ import annotations

import json
import threading
import time

import pytest

from engine.request import Request
from tests.helpers import max_diff, metric, png_pixels, running_server, wait_until


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    with running_server(ort_engines, tmp_path_factory.mktemp("serve-step"), "--batching", "step",
                        "--max-batch", "4", "--max-queue", "3") as s:
        yield s


@pytest.fixture(scope="module")
def library(ort_pipeline):
    return ort_pipeline


def post(server, body: dict, timeout: float = 120) -> tuple[int, dict]:
    status, data, _ = server.post("/v1/generate", body, timeout=timeout)
    return status, json.loads(data)


def test_mixed_step_counts_share_steps_and_match_the_library(server, library):
    bodies = [{"prompt": f"harbour {i}", "steps": steps, "seed": 70 + i, "guidance_scale": 4.0 + i,
               "sampler": "euler_a"} for i, steps in enumerate((12, 4, 8))]
    results: dict[int, tuple[int, dict]] = {}
    execs_before = metric(server, "sd_inference_exec_count_total")

    def send(i: int) -> None:
        if i:  # later arrivals join a flight that is already running: the first request's steps have begun
            wait_until(lambda: metric(server, "sd_inference_exec_count_total") > execs_before, 60,
                       "the first request's flight never ran a step")
        results[i] = post(server, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(results) == [0, 1, 2]
    assert all(status == 200 for status, _ in results.values()), results
    assert max(doc["batch_images"] for _, doc in results.values()) >= 2  # rows were in flight together
    steps_run = metric(server, "sd_inference_exec_count_total") - execs_before
    assert steps_run < sum(b["steps"] for b in bodies)  # shared steps: fewer UNet calls than steps requested
    for i, body in enumerate(bodies):
        want = library.run(Request(**{k: v for k, v in body.items()}), progress=False)[0].pixels
        got = png_pixels(results[i][1]["images"][0]["b64_png"])
        assert max_diff(got, want) <= 1


def test_more_images_than_a_flight_holds_is_a_400_naming_the_field(server):
    status, body = post(server, {"prompt": "five", "steps": 2, "images": 5})  # --max-batch 4
    assert status == 400, body
    assert body["error"]["param"] == "images" and "over --max-batch 4" in body["error"]["message"]
    status, data, _ = server.post("/v1/images/generations", {"prompt": "five", "n": 5}, timeout=60)
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == "n" and "n 5 is over --max-batch 4" in err["message"]


@pytest.mark.parametrize("field, value", [("hires_scale", 2), ("refiner_switch", 0.8)])
def test_two_pass_requests_are_refused_naming_the_field(server, field, value):
    status, body = post(server, {"prompt": "big", "steps": 2, field: value})
    assert status == 400 and body["error"]["param"] == field, body
    assert "--batching request" in body["error"]["message"]


def test_a_streamed_request_is_a_400_naming_stream(server):
    status, body = post(server, {"prompt": "a", "steps": 2, "stream": True})
    assert status == 400 and body["error"]["param"] == "stream", body


def test_queue_bound_answers_429_and_everything_accepted_finishes(server):
    bodies = [{"prompt": f"flood {i}", "steps": 30, "seed": i, "images": 4} for i in range(8)]
    out: list[int] = []
    lock = threading.Lock()

    def send(body: dict) -> None:
        status, _ = post(server, body, timeout=300)
        with lock:
            out.append(status)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert len(out) == 8 and set(out) <= {200, 429}
    assert out.count(429) >= 1 and out.count(200) >= 2  # one flight of 4 rows runs, 3 wait, the rest are refused


def test_a_client_that_leaves_frees_its_rows(server, library):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=1)
    execs_before = metric(server, "sd_inference_exec_count_total")
    conn.request("POST", "/v1/generate", json.dumps({"prompt": "gone", "steps": 200, "images": 4}),
                 {"Content-Type": "application/json"})
    wait_until(lambda: metric(server, "sd_inference_exec_count_total") >= execs_before + 2, 60,
               "the 200-step flight never started")
    conn.close()  # the client goes away mid-flight
    t0 = time.perf_counter()
    status, doc = post(server, {"prompt": "next", "steps": 3, "seed": 5, "images": 4})
    assert status == 200, doc
    # had the 4 abandoned rows kept their slots for 200 steps, this 4-image request could not have joined
    assert time.perf_counter() - t0 < 60
    want = library.run(Request(prompt="next", steps=3, seed=5, images=4), progress=False)
    for g, img in zip(want, doc["images"], strict=True):
        assert max_diff(png_pixels(img["b64_png"]), g.pixels) <= 1
