"""The server under hostile input (issue 31): error shapes, cancellation, API key / Origin / Host checks, connection
limits, strict body types and a resolvable OpenAPI document.

One `python -m engine.serve` on loopback (tiny ONNX Runtime engines, no warm-up, with an API key and one CORS
origin) serves the HTTP tests; none of them generates. The step batcher runs in-process on the session's tiny
pipeline; the connection limits run uvicorn in a thread around a one-line ASGI app. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
import errno
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from engine.request import Request, RequestError
from engine.server.batcher import Batcher
from engine.server.config import ServeConfig
from engine.server.schemas import ApiError, GenerateBody, decode_image
from engine.server.step_batcher import StepBatcher
from tests.helpers import running_server, wait_until

KEY = "test-key-31"
CORS_ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_STEPS = 1000  # a request that would hold the flight for many seconds if its rows were not dropped
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    with running_server(ort_engines, tmp_path_factory.mktemp("serve-hardening"), "--no-warmup", "--api-key", KEY,
                        "--cors-origin", CORS_ORIGIN) as s:
        yield s


def call(server, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
         content_type: str = "application/json") -> tuple[int, dict | bytes, dict[str, str]]:
    """(status, JSON body or raw bytes, lower-case headers) of one request with exactly these headers."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = dict(headers or {})
    if data is not None:
        sent.setdefault("Content-Type", content_type)
    try:
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        raw = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    return resp.status, json.loads(raw) if got.get("content-type", "").startswith("application/json") else raw, got


def assert_error(answer, status: int, param: str | None = None) -> dict:
    """The answer is `status` with OpenAI's error shape (and names `param`, if given)."""
    got, doc, _ = answer
    assert got == status, (got, doc)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
    if param is not None:
        assert doc["error"]["param"] == param, doc
    return doc["error"]


# ---- item 6: one error shape ----


def test_data_url_without_a_comma_is_a_400_naming_the_field(server):
    with pytest.raises(ApiError) as err:
        decode_image("data:image/png;base64", "init_image")
    assert err.value.status == 400 and err.value.param == "init_image"
    answer = call(server, "POST", "/v1/generate", {"prompt": "x", "init_image": "data:image/png;base64"}, AUTH)
    assert "data URL" in assert_error(answer, 400, "init_image")["message"]


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_an_image_format_the_message_does_not_list_is_a_400(fmt):
    """The 400 says PNG, JPEG or WebP; before the fix TIFF and BMP (any format PIL reads) were decoded."""
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    with pytest.raises(ApiError) as err:
        decode_image(buf.getvalue(), "init_image")
    assert err.value.status == 400 and err.value.param == "init_image"
    assert "PNG, JPEG or WebP" in err.value.message
    for ok in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        PIL.Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=ok)
        assert decode_image(buf.getvalue(), "init_image").size == (8, 8)


def test_405_is_json_and_names_the_allowed_methods(server):
    status, doc, headers = call(server, "GET", "/v1/generate", headers=AUTH)
    assert_error((status, doc, headers), 405)
    assert headers.get("allow") == "POST"


def test_an_upload_that_cannot_be_stored_is_a_json_503_without_the_path():
    from engine.server.bodies import read_generate_body

    class FullDisk:  # what Starlette's multipart parser raises when its spool file cannot be written
        headers = {"content-type": "multipart/form-data; boundary=x"}

        async def form(self, **_):
            raise OSError(errno.ENOSPC, "No space left on device", "/var/tmp/secret-spool")

    with pytest.raises(ApiError) as err:
        asyncio.run(read_generate_body(FullDisk(), admit=lambda: None, decode=_never_decoded))
    assert err.value.status == 503 and "secret" not in err.value.message and err.value.headers["Retry-After"]


# ---- item 1: a cancelled request stops costing compute ----


def test_step_batching_drops_a_cancelled_row_at_the_next_step(ort_pipeline):
    """Before the fix the row ran all its steps: asyncio cancels job.future with the task, so `not done()` was
    False and the row was never marked cancelled."""
    asyncio.run(_cancel_in_flight(ort_pipeline))


async def _cancel_in_flight(pipe) -> None:
    batcher = StepBatcher(pipe, max_batch=2, max_queue=4)
    rows_per_step: list[int] = []  # rows in flight at each step
    real_step = batcher.flight.step

    def counting_step() -> None:
        rows_per_step.append(len(batcher.flight.slots))
        real_step()

    batcher.flight.step = counting_step
    batcher.start()
    prepared = pipe.prepare(Request(prompt="a long one", steps=LONG_STEPS, sampler="euler", seed=1))
    task = asyncio.ensure_future(batcher.submit(prepared))
    try:
        await _until(lambda: len(rows_per_step) >= 2, "the request never started stepping")
        cancelled_at = len(rows_per_step)
        task.cancel()
        # bounded: stop looking once the row is gone, or once it has clearly outlived two step boundaries
        await _until(lambda: not batcher.flight.slots or len(rows_per_step) > cancelled_at + 10, "no step ran")
        late = [n for n in rows_per_step[cancelled_at:] if n]
        assert not batcher.flight.slots and len(late) <= 2, f"the cancelled row ran {len(late)} more steps"
    finally:
        batcher.close()
    await asyncio.wait_for(batcher.drained.wait(), DEADLINE_S)


def test_request_batching_stops_a_batch_nobody_waits_for_at_the_next_step(ort_pipeline):
    """Before the fix a running batch ran all its steps after its only caller went away (a 504 or a disconnect
    held the engine for the rest of a 1000-step request)."""
    asyncio.run(_cancel_running_batch(ort_pipeline))


async def _cancel_running_batch(pipe) -> None:
    steps: list[float] = []
    real_step = pipe.step

    def counting_step(*args):
        steps.append(time.perf_counter())
        return real_step(*args)

    def run(requests, batch_size, stop, _previews=None):
        return pipe.run(requests, progress=False, batch_size=batch_size, stop=stop)

    batcher = Batcher(run, max_batch=1, max_wait_s=0.0, max_queue=4)
    pipe.step = counting_step  # an instance attribute over the method; removed below
    try:
        batcher.start()
        prepared = pipe.prepare(Request(prompt="a long one", steps=LONG_STEPS, sampler="euler", seed=1))
        task = asyncio.ensure_future(batcher.submit(prepared))
        await _until(lambda: len(steps) >= 2, "the request never started stepping")
        cancelled_at = len(steps)
        task.cancel()
        batcher.close()  # the worker sets `drained` once the running batch has returned
        await asyncio.wait_for(batcher.drained.wait(), DEADLINE_S)
    finally:
        del pipe.step
    assert len(steps) - cancelled_at <= 2, f"the batch ran {len(steps) - cancelled_at} steps after its cancel"


def test_request_batching_never_runs_a_request_cancelled_while_queued():
    """Request batching already held this (a cancelled job leaves the queue at once); kept as a regression test."""
    asyncio.run(_cancel_queued())


async def _cancel_queued() -> None:
    ran: list[str] = []
    gate = threading.Event()

    def run(requests, _batch_size, _stop, _previews=None):
        ran.extend(r.request.prompt for r in requests)
        gate.wait(DEADLINE_S)  # the first batch holds the worker while the second request is cancelled
        return [object()] * sum(r.request.images for r in requests)

    batcher = Batcher(run, max_batch=1, max_wait_s=0.0, max_queue=4)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(_prepared("first")))
    await _until(lambda: ran == ["first"], "the first batch never started")
    second = asyncio.ensure_future(batcher.submit(_prepared("second")))
    await _until(lambda: batcher.depth == 1, "the second request never queued")
    second.cancel()
    await _until(lambda: batcher.depth == 0, "the cancelled request stayed queued")
    gate.set()
    await asyncio.wait_for(first, DEADLINE_S)
    batcher.close()
    await asyncio.wait_for(batcher.drained.wait(), DEADLINE_S)
    assert ran == ["first"]


class _Prepared:
    """What Batcher reads of a PreparedRequest."""

    def __init__(self, prompt: str):
        self.request = Request(prompt=prompt)
        self.batch_key = ("same",)


def _prepared(prompt: str):
    return _Prepared(prompt)


async def _until(pred, message: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"not true after {timeout_s} s: {message}"
        await asyncio.sleep(0.01)


# ---- item 2: memory that only grew ----


def test_sampler_tables_are_kept_in_a_bounded_lru_filled_only_by_valid_requests(ort_pipeline, tmp_path):
    """Before the fix every distinct (sampler, steps, strength) a client sent stayed cached, even when the request
    was then refused (prepare built and kept its tables first)."""
    from engine.pipeline import MAX_SCHEDULES

    pipe = ort_pipeline
    before = pipe._schedules.keys()
    steps_range = range(2, 2 + MAX_SCHEDULES + 20)
    for steps in steps_range:  # refused after the schedule check (its init image does not exist): nothing kept
        with pytest.raises(RequestError):
            pipe.prepare(Request(prompt="x", steps=steps, sampler="euler", init_image=tmp_path / "none.png"))
    assert pipe._schedules.keys() == before
    for steps in steps_range:  # valid: kept, at most MAX_SCHEDULES of them, the newest
        pipe.prepare(Request(prompt="x", steps=steps, sampler="euler"))
    keys = [("euler", steps, None, 0.0) for steps in steps_range]  # (sampler, steps, strength, eta)
    assert len(pipe._schedules) == MAX_SCHEDULES
    assert pipe._schedules.keys()[-MAX_SCHEDULES:] == keys[-MAX_SCHEDULES:]
    first = pipe.schedule(*keys[-1])
    assert pipe.schedule(*keys[-1]) is first  # a hit returns the kept tables


# ---- item 5: API key, CORS, Host, Origin ----


def test_every_route_but_health_needs_the_key(server):
    for path in ("/healthz", "/readyz"):
        assert call(server, "GET", path)[0] == 200, path
    for method, path in (("GET", "/v1/info"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/"),
                         ("POST", "/v1/generate"), ("POST", "/v1/images/generations")):
        body = {"prompt": "x"} if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = call(server, method, path, body, headers)
            assert_error(answer, 401)
            assert answer[2].get("www-authenticate") == "Bearer", (path, headers)
    assert call(server, "GET", "/v1/info", headers=AUTH)[0] == 200


def test_the_openai_client_with_a_wrong_key_gets_authentication_error(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="x", size="64x64")


def test_cors_is_off_by_default_and_on_for_listed_origins(server):
    from starlette.middleware.cors import CORSMiddleware

    from engine.server.app import create_app

    assert ServeConfig().cors_origins == ()
    assert CORSMiddleware not in [m.cls for m in create_app(ServeConfig()).user_middleware]
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, _, headers = call(server, "OPTIONS", "/v1/generate", headers=preflight)
    assert status == 200 and headers.get("access-control-allow-origin") == CORS_ORIGIN
    status, _, headers = call(server, "OPTIONS", "/v1/generate", headers={**preflight, "Origin": "https://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers


def test_a_cross_site_post_is_refused_and_same_origin_passes(server):
    bad_body = {"prompt": "x", "seed": "7"}  # past the origin check: a 400 for the seed, not a 403
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        assert_error(call(server, "POST", "/v1/generate", bad_body, {**AUTH, "Origin": origin}), 403)
    form = b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b--\r\n"
    assert_error(call(server, "POST", "/v1/generate", form, {**AUTH, "Origin": "https://evil.example"},
                      "multipart/form-data; boundary=b"), 403)
    for origin in (server.url, CORS_ORIGIN):
        answer = call(server, "POST", "/v1/generate", bad_body, {**AUTH, "Origin": origin})
        assert_error(answer, 400, "seed")
    assert call(server, "GET", "/v1/info", headers={**AUTH, "Origin": "https://evil.example"})[0] == 200


def test_only_loopback_host_names_are_answered_on_loopback(server):
    port = urlsplit(server.url).port
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
        assert call(server, "GET", "/healthz", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        assert "Host" in assert_error(call(server, "GET", "/healthz", headers={"Host": host}), 400)["message"]


def test_allowed_hosts_and_the_api_key_come_from_flags_and_the_environment(monkeypatch):
    from engine.serve import API_KEY_ENV, parse_args
    from engine.server.access import allowed_hosts

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    cfg = parse_args(["--allowed-host", "sd.internal", "--cors-origin", "https://a.example", "--cors-origin",
                      "https://b.example"])
    assert cfg.api_key == "from-env" and cfg.cors_origins == ("https://a.example", "https://b.example")
    assert "from-env" not in repr(cfg)
    assert parse_args(["--api-key", "flag"]).api_key == "flag"
    assert allowed_hosts(cfg.host, cfg.allowed_hosts) == {"localhost", "127.0.0.1", "::1", "sd.internal"}
    assert allowed_hosts("0.0.0.0", ()) is None and allowed_hosts("0.0.0.0", ("a.example",)) == {"a.example"}


# ---- item 10 (part): strict types, a complete OpenAPI document ----


@pytest.mark.parametrize("field, value", [("seed", False), ("seed", "7"), ("steps", 4.0), ("images", True),
                                          ("guidance_scale", "7.5"), ("resize", 1)])
def test_values_of_the_wrong_json_type_are_refused(server, field, value):
    assert_error(call(server, "POST", "/v1/generate", {"prompt": "x", field: value}, AUTH), 400, field)


def test_openai_route_refuses_a_string_n(server):
    assert_error(call(server, "POST", "/v1/images/generations", {"prompt": "x", "n": "2"}, AUTH), 400, "n")


def test_form_fields_are_still_parsed_as_numbers():
    body = GenerateBody.model_validate({"prompt": "x", "seed": "7", "strength": "0.5", "resize": "true"}, strict=False)
    assert (body.seed, body.strength, body.resize) == (7, 0.5, True)


def test_the_openapi_document_resolves_and_documents_every_error(server):
    status, doc, _ = call(server, "GET", "/openapi.json", headers=AUTH)
    assert status == 200
    unresolved = [ref for ref in _refs(doc) if not _resolves(doc, ref)]
    assert not unresolved, unresolved
    for path in ("/v1/generate", "/v1/images/generations"):
        responses = doc["paths"][path]["post"]["responses"]
        for code in ("400", "401", "413", "429", "503"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)
        assert "422" not in responses
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    body = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["loras"]["items"] == {"$ref": "#/components/schemas/LoraRef"}


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from [v] if k == "$ref" else _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _resolves(doc: dict, ref: str) -> bool:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ---- item 4: connection limits ----


@pytest.fixture
def small_uvicorn():
    """A factory: uvicorn with `uvicorn_options(ServeConfig(**limits))` around a one-line app, in a thread,
    on a free loopback port; stopped at the end."""
    import uvicorn

    from engine.server.connections import uvicorn_options
    from tests.helpers import free_port

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def start(**limits) -> int:
        port = free_port()
        cfg = ServeConfig(**limits)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="off", **uvicorn_options(cfg)))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started, DEADLINE_S, "uvicorn did not start")
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(DEADLINE_S)


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes `sock` within `timeout_s` (reading and dropping what it sends)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _trickled_until_closed(sock: socket.socket, lines: int) -> bool:
    """A slow-loris: a request head sent one header line every 0.1 s (which keeps uvicorn's idle timer from
    firing); whether the server closed the connection before `lines` lines."""
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(lines):
            time.sleep(0.1)
            sock.sendall(b"X-A: b\r\n")
    except (BrokenPipeError, ConnectionResetError):
        return True
    return _closed_within(sock, 0.5)


def test_a_connection_that_never_finishes_its_head_is_closed(small_uvicorn):
    port = small_uvicorn(header_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        assert _closed_within(idle, 5.0), "a connection that sent nothing stayed open"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        t0 = time.monotonic()
        assert _trickled_until_closed(slow, lines=40), "a slow head kept its connection"
        assert time.monotonic() - t0 < 3.0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as ok:  # a whole request is answered
        ok.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert ok.recv(4096).startswith(b"HTTP/1.1 200")


def test_connections_past_the_cap_get_503_and_huge_heads_400(small_uvicorn):
    port = small_uvicorn(limit_concurrency=2, max_header_kb=1, header_timeout_s=30.0)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        def third_answer() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return s.recv(4096)

        wait_until(lambda: third_answer().startswith(b"HTTP/1.1 503"), DEADLINE_S, "no 503 past the cap")
    finally:
        for s in held:
            s.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # h11 bounds the head it buffers while incomplete: an unfinished head over --max-header-kb is refused
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 4096)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") or answer == b"", answer[:80]


def test_connection_flags_reach_uvicorn():
    from engine.serve import parse_args
    from engine.server.connections import HeadDeadlineH11, uvicorn_options

    cfg = parse_args(["--limit-concurrency", "50", "--timeout-keep-alive-s", "3", "--header-timeout-s", "2.5",
                      "--max-header-kb", "8"])
    opts = uvicorn_options(cfg)
    assert (opts["limit_concurrency"], opts["timeout_keep_alive"], opts["h11_max_incomplete_event_size"]) == \
        (50, 3, 8 * 1024)
    assert issubclass(opts["http"], HeadDeadlineH11) and opts["http"].header_timeout_s == 2.5


async def _never_decoded(source, field):
    raise AssertionError(f"{field} was decoded, though its upload could not be stored")
