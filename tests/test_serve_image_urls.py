"""OpenAI `url` answers (issue 32 item 1): hosted PNGs under a server-chosen folder, unguessable names, expiry.

Servers (`python -m engine.serve` on loopback, tiny ONNX Runtime engines, no warm-up, 2 steps): one with an API
key and the default image folder (<engine_dir>/.serve/images) for the client, path and Host tests; one with a
1 s --image-ttl-s; one with a --image-dir-mb smaller than one image and a --public-url. Oracles: the official
`openai` client with its defaults, Pillow, the same request answered as b64_json, and the folder on disk.
`ImageStore` is also tested alone, with file times set by hand. Every wait has a deadline.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import PIL.Image
import pytest

from tests.helpers import metric, png_pixels, running_server, wait_until

KEY = "test-key-32"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEPS = 2
FILES = "/v1/images/files/"
NAME = re.compile(r"[A-Za-z0-9_-]{32}\.png")  # secrets.token_urlsafe(24) + ".png": 192 random bits
TTL_S = 1.0
PUBLIC = "https://sd.example/base"
DEADLINE_S = 20.0


def _server(ort_engines, tmp_path_factory, name: str, *flags: str):
    return running_server(ort_engines, tmp_path_factory.mktemp(name), "--no-warmup", *flags)


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    with _server(ort_engines, tmp_path_factory, "urls", "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def short_ttl(ort_engines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ttl-images")
    with _server(ort_engines, tmp_path_factory, "urls-ttl", "--image-dir", str(folder), "--image-ttl-s",
                 str(TTL_S)) as s:
        yield s, folder


@pytest.fixture(scope="module")
def small_folder(ort_engines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-images")
    with _server(ort_engines, tmp_path_factory, "urls-small", "--image-dir", str(folder), "--image-dir-mb", "0.001",
                 "--public-url", PUBLIC + "/") as s:
        yield s, folder


def call(server, method: str, path: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, raw body, lower-case headers) with exactly these headers and this path (not normalised)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    sent = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def urls(server, headers: dict | None = None, **body) -> list[str]:
    """The URLs of a POST /v1/images/generations answer (no response_format: OpenAI's default)."""
    status, data, _ = call(server, "POST", "/v1/images/generations", {"prompt": "a boat", "steps": STEPS, **body},
                           headers)
    assert status == 200, data
    items = json.loads(data)["data"]
    assert all(set(item) == {"url"} for item in items), items
    return [item["url"] for item in items]


def name_of(url: str) -> str:
    name = url.rsplit("/", 1)[1]
    assert NAME.fullmatch(name), url
    return name


def fetch(url: str) -> tuple[int, bytes, dict[str, str]]:
    """GET without any header of ours (no API key), as a browser or a client's download would."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


def assert_404(answer) -> None:
    status, data, headers = answer
    assert status == 404, (status, data[:200])
    assert headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


# ---- the official client, defaults only ----


def test_the_openai_client_with_defaults_gets_urls_it_can_fetch(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    ask = {"model": "tiny", "prompt": "a red fox in snow", "size": "64x64", "n": 2,
           "extra_body": {"steps": STEPS, "seed": 17}}
    hosted = client.images.generate(**ask)  # no response_format: the client omits it, and OpenAI's default is url
    inline = client.images.generate(**ask, response_format="b64_json")
    assert [d.b64_json for d in hosted.data] == [None, None]
    links = [d.url for d in hosted.data]
    assert all(link.startswith(server.url + FILES) for link in links) and len({name_of(u) for u in links}) == 2
    for link, b64 in zip(links, [d.b64_json for d in inline.data], strict=True):
        status, png, headers = fetch(link)  # no Authorization: the random name is the credential
        assert status == 200 and headers["content-type"] == "image/png", (status, png[:200])
        with PIL.Image.open(io.BytesIO(png)) as img:
            assert (img.format, img.size) == ("PNG", (64, 64))
        assert (png_pixels(png) == png_pixels(b64)).all(), "the hosted image is not the b64_json one"
    assert call(server, "GET", "/v1/info")[0] == 401  # the key is still asked everywhere else
    label = 'sd_http_requests_total{path="/v1/images/files/{name}",status="200"}'
    status, text, _ = call(server, "GET", "/metrics", headers=AUTH)
    assert status == 200 and label in text.decode() and "sd_hosted_image_bytes" in text.decode()


def test_the_url_uses_the_request_scheme_and_host(server):
    port = urlsplit(server.url).port
    for host in (f"localhost:{port}", f"[::1]:{port}"):
        [link] = urls(server, {**AUTH, "Host": host})
        assert link.startswith(f"http://{host}{FILES}"), link


# ---- names: no traversal, no choice of path ----


def test_unknown_and_malformed_names_are_404_json(server, ort_engines):
    folder = ort_engines / ".serve" / "images"
    [link] = urls(server, AUTH)
    real = name_of(link)
    (folder / "planted.png").write_bytes((folder / real).read_bytes())  # exists, but not a name of ours
    for path in (FILES + "A" * 32 + ".png", FILES + real[:-4], FILES + real + ".png", FILES + real.upper(),
                 FILES + "planted.png", FILES + f".{real}.tmp", FILES + "..%2F..%2Fbuild.json",
                 FILES + "../../tiny/build.json", FILES + "%2e%2e/%2e%2e/tiny/build.json", FILES + "",
                 FILES + real + "/x"):
        assert_404(call(server, "GET", path))  # and no 401: the files route does not ask for the key
    assert call(server, "GET", FILES[:-1])[0] == 401  # not a file path: the key is asked
    assert_404(call(server, "GET", FILES[:-1], headers=AUTH))
    assert call(server, "GET", FILES + real)[0] == 200


def test_the_request_cannot_choose_the_path(server, ort_engines):
    folder = ort_engines / ".serve" / "images"  # the default: the engine directory's state
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    [link] = urls(server, AUTH, user="../../../evil", model="../evil.png")
    name = name_of(link)
    assert (folder / name).is_file() and set(os.listdir(folder)) - before == {name}
    assert not list(ort_engines.rglob("evil*"))
    for field in ("image_dir", "path", "filename", "name"):
        status, data, _ = call(server, "POST", "/v1/images/generations",
                               {"prompt": "x", "steps": STEPS, field: "/tmp/chosen.png"}, AUTH)
        assert status == 400 and json.loads(data)["error"]["param"] == field, data
    status, data, _ = call(server, "POST", "/v1/images/generations", {"prompt": "x", "response_format": "file"}, AUTH)
    assert status == 400 and json.loads(data)["error"]["param"] == "response_format"


# ---- expiry: time and folder size ----


def test_an_image_is_gone_after_the_ttl(short_ttl):
    server, folder = short_ttl
    [link] = urls(server)
    path = folder / name_of(link)
    assert path.is_file()
    # the periodic sweep deletes it from disk (nothing reads it meanwhile), then its URL answers 404
    wait_until(lambda: not path.exists(), TTL_S + DEADLINE_S, "the expired image stayed on disk")
    assert_404(call(server, "GET", urlsplit(link).path))
    assert metric(server, 'sd_hosted_images_removed_total{reason="expired"}') >= 1


def test_past_the_folder_cap_the_oldest_images_go_and_public_url_is_used(small_folder):
    server, folder = small_folder
    [first] = urls(server)
    assert first.startswith(PUBLIC + FILES), first
    old = folder / name_of(first)
    assert old.stat().st_size > 0.001 * 2**20  # one image passes the cap
    newer = urls(server, n=2)
    assert all(link.startswith(PUBLIC + FILES) for link in newer)
    assert not old.exists(), "the oldest image was kept past --image-dir-mb"
    for link in newer:  # the newest request's images are kept even when they alone pass the cap
        status, png, _ = call(server, "GET", urlsplit(link).path.removeprefix("/base"))
        assert status == 200 and png == (folder / name_of(link)).read_bytes()
    assert_404(call(server, "GET", FILES + name_of(first)))
    assert metric(server, 'sd_hosted_images_removed_total{reason="over_size"}') >= 1
    assert metric(server, "sd_hosted_images", required=True) == 2


# ---- configuration and the OpenAPI document ----


def test_flags_and_their_checks(capsys, tmp_path):
    from engine.serve import parse_args
    from engine.server.config import ServeConfig
    from engine.server.ray_app import _validate

    d = parse_args([])
    assert (d.image_dir, d.image_ttl_s, d.image_dir_mb, d.public_url) == (None, 3600.0, 1024.0, None)
    assert d.image_folder == Path("engines") / ".serve" / "images"
    cfg = parse_args(["--image-dir", str(tmp_path / "new" / "images"), "--image-ttl-s", "60", "--image-dir-mb", "5",
                      "--public-url", "https://sd.example/x/"])
    assert (cfg.image_folder, cfg.image_ttl_s, cfg.image_dir_mb, cfg.public_url) == \
        (tmp_path / "new" / "images", 60.0, 5.0, "https://sd.example/x")
    assert not (tmp_path / "new").exists()  # parsing creates nothing
    a_file = tmp_path / "file"
    a_file.write_text("")
    for argv, words in ((["--image-ttl-s", "0"], "--image-ttl-s: 0.0 must be > 0"),
                        (["--image-dir-mb", "-1"], "--image-dir-mb: -1.0 must be > 0"),
                        (["--public-url", "ftp://sd.example"], "--public-url"),
                        (["--public-url", "https://sd.example/?a=1"], "without a query"),
                        (["--public-url", "sd.example"], "--public-url"),
                        (["--image-dir", str(a_file / "images")], "is not a directory")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and words in err, err
    with pytest.raises(ValueError, match="image_ttl_s"):
        _validate(ServeConfig(image_ttl_s=-1))


def test_the_openapi_document_has_the_files_route_and_the_url_answer(server):
    status, data, _ = call(server, "GET", "/openapi.json", headers=AUTH)
    assert status == 200
    doc = json.loads(data)
    files = doc["paths"][FILES + "{name}"]["get"]["responses"]
    assert set(files["200"]["content"]) == {"image/png"}
    assert files["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "401" not in files and "422" not in files
    answer = doc["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"] == {"$ref": "#/components/schemas/ImagesAnswer"}
    assert "url" in doc["components"]["schemas"]["ImageData"]["properties"]
    body = doc["components"]["schemas"]["ImagesBody"]["properties"]["response_format"]
    assert "url" in json.dumps(body)


def test_an_unusable_folder_makes_url_answers_503_without_its_path(tmp_path):
    """A read-only engine directory: the server still starts; `url` asks are a 503 naming --image-dir."""
    import asyncio

    from engine.server.app import ServerState
    from engine.server.config import ServeConfig
    from engine.server.schemas import ApiError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    state = ServerState(ServeConfig(engine_dir=tmp_path, image_dir=blocker / "images"))
    asyncio.run(state._open_images())
    with pytest.raises(ApiError) as err:
        asyncio.run(state.save_images([b"png"]))
    assert err.value.status == 503 and err.value.param == "response_format"
    assert "--image-dir" in err.value.message and str(tmp_path) not in err.value.message


# ---- the store alone ----


def test_store_writes_atomically_and_serves_only_its_names(tmp_path):
    from engine.server.image_files import ImageStore

    store = ImageStore(tmp_path / "images", ttl_s=60, max_bytes=2**20)
    store.open()
    names = store.save([b"one", b"two"])
    assert len(set(names)) == 2 and all(NAME.fullmatch(n) for n in names)
    assert sorted(os.listdir(tmp_path / "images")) == sorted(names)  # no temp file left
    data, left = store.read(names[0])
    assert data == b"one" and 59 < left <= 60
    (tmp_path / "secret.png").write_bytes(b"s")
    for bad in ("../secret.png", "secret.png", "/etc/passwd", names[0] + "/", "." + names[0] + ".tmp", ""):
        assert store.read(bad) is None


def _aged(path: Path, data: bytes, age_s: float) -> Path:
    path.write_bytes(data)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_store_sweeps_expired_and_oldest_but_keeps_foreign_files(tmp_path):
    from engine.server.image_files import ImageStore

    store = ImageStore(tmp_path, ttl_s=100, max_bytes=250)
    n = iter("ABCDEFGH")
    expired = _aged(tmp_path / f"{next(n) * 32}.png", b"x" * 100, 150)
    stale_temp = _aged(tmp_path / f".{next(n) * 32}.png.tmp", b"x" * 100, 150)
    fresh_temp = _aged(tmp_path / f".{next(n) * 32}.png.tmp", b"x" * 100, 1)
    oldest, middle, newest = (_aged(tmp_path / f"{next(n) * 32}.png", b"x" * 100, age) for age in (30, 20, 10))
    foreign = _aged(tmp_path / "notes.txt", b"x" * 1000, 1000)
    swept = store.sweep()
    assert (swept.expired, swept.over_size, swept.files, swept.total_bytes) == (1, 1, 2, 200)
    assert not expired.exists() and not stale_temp.exists() and not oldest.exists()
    assert fresh_temp.exists() and middle.exists() and newest.exists() and foreign.exists()
    assert store.read(middle.name)[0] == b"x" * 100
    _aged(newest, b"x" * 100, 100)  # expired between sweeps: refused (and deleted) on read
    assert store.read(newest.name) is None and not newest.exists()


def test_store_keeps_the_images_it_just_wrote_even_past_the_cap(tmp_path):
    from engine.server.image_files import ImageStore

    store = ImageStore(tmp_path, ttl_s=100, max_bytes=10)
    first = store.save([b"x" * 20])
    second = store.save([b"y" * 20, b"z" * 20])
    assert sorted(os.listdir(tmp_path)) == sorted(second) and first[0] not in second
