"""Fuzz: random bodies against both generation routes of a live server never get a 5xx or a non-JSON error.

Hypothesis draws bodies from the routes' own field names (plus unknown ones) with values of every JSON
type, and raw bytes. Valid draws really generate, so sizes, steps and image counts are kept small enough
for CI; everything else is fair game. derandomize=True: CI runs the same examples every time.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.samplers import SAMPLERS
from engine.server.schemas import GenerateBody, ImagesBody
from tests.helpers import b64_png, running_server

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
st = hypothesis.strategies

SETTINGS = hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))

text = st.one_of(st.text(max_size=60), st.sampled_from(["", "a cat", "\x00", "\ud800", "tab\tok\n", "\x1b[31m",
                                                        "\u202e", "x" * 5000]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.integers(), st.floats(allow_nan=True),
                   text, st.sampled_from(["64x64", "72x64", "0x0", "auto", "ddim", "lcm", "png", "json",
                                          "b64_json", "url", "iVBORw0KGgo=", "data:image/png;base64,AAAA"]))
value = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=4), scalar, max_size=2))
small_side = st.one_of(st.none(), st.integers(-16, 128), st.sampled_from([48, 64, 80]), text)
tiny_png = b64_png(np.zeros((64, 64, 3), np.uint8))
PLAUSIBLE = {  # mostly-valid values, so draws get past the first field and reach the engines
    "prompt": text, "negative_prompt": text, "guidance_scale": st.floats(-1, 20), "seed": st.integers(-2, 2**64),
    "sampler": st.sampled_from([*SAMPLERS, "bad"]), "scheduler": st.sampled_from([*SAMPLERS, "bad"]),
    "strength": st.floats(-0.1, 1.2), "resize": st.booleans(), "model": text,
    "response_format": st.sampled_from(["json", "png", "b64_json", "url"]),
    "size": st.sampled_from(["64x64", "48x80", "72x64", "auto", "1x1", "64X64", "64x"]),
    "init_image": st.sampled_from([tiny_png, "bad", "data:image/png;base64," + tiny_png]),
    "mask": st.sampled_from([tiny_png, "////"]), "height": small_side, "width": small_side,
    "steps": st.one_of(st.integers(-2, 12), value), "images": st.integers(-1, 3), "n": st.integers(-1, 3),
}


def bodies(fields: list[str]):
    optional = {f: st.one_of(PLAUSIBLE.get(f, value), PLAUSIBLE.get(f, value), value) for f in fields if f != "prompt"}
    unknown = st.dictionaries(st.sampled_from(["junk", "", "Prompt", "prompt ", "__proto__"]), value, max_size=1)
    printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
    prompt = st.one_of(st.just({}), st.fixed_dictionaries({"prompt": text}),
                       *[st.fixed_dictionaries({"prompt": printable})] * 6)  # mostly present and valid
    body = st.fixed_dictionaries({}, optional=optional)
    return st.tuples(prompt, body, unknown, st.sampled_from([True] * 6 + [False]))\
        .map(lambda t: {**t[0], **t[1], **(t[2] if not t[3] else {})})


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    flags = ("--max-images", "2", "--max-body-mb", "1", "--max-wait-ms", "0", "--timeout-s", "60")
    with running_server(ort_engines, tmp_path_factory.mktemp("fuzz"), *flags) as s:
        yield s


def assert_clean_answer(status: int, data: bytes, sent) -> None:
    assert status < 500, f"{status} for {sent!r}: {data[:300]!r}"
    if status != 200:
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str) and error["message"], (sent, error)
        assert error["param"] is None or isinstance(error["param"], str), (sent, error)


@pytest.mark.parametrize("path,model", [("/v1/generate", GenerateBody), ("/v1/images/generations", ImagesBody)])
def test_random_bodies_never_5xx(server, path, model):
    fields = list(model.model_fields)

    @SETTINGS
    @hypothesis.given(body=bodies(fields))
    def check(body):
        data = json.dumps(body).encode()  # NaN / Infinity are not JSON: the server must say so, not crash
        status, answer, _ = server.post(path, data)
        assert_clean_answer(status, answer, body)

    check()


def test_random_bytes_never_5xx(server):
    @SETTINGS
    @hypothesis.given(data=st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
    def check(data):
        for path in ("/v1/generate", "/v1/images/generations"):
            status, answer, _ = server.post(path, data)
            assert_clean_answer(status, answer, data)

    check()
