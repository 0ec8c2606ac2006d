"""LoRA work done once (engine/lora_cache.py): a file is parsed once per version (a rewritten file is read again,
another name of the same file shares its tensors, concurrent first reads parse once, the LRU is bounded), and
OpenVINO / ONNX Runtime runners keep a few compiled forms, so alternating adapters compiles each once and gives the
pixels a fresh compile gives."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from engine import lora  # noqa: E402
from engine.lora import Adapter, load_lora, read_lora  # noqa: E402
from engine.lora_cache import VARIANTS_ENV, LoraFileCache, Lru, file_key, weights_key  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.request import Request  # noqa: E402
from tests.helpers import max_diff, write_kohya  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("cache_loras")
    return write_kohya(out, 41, r=4, alpha=2.0), write_kohya(out, 42, r=4, alpha=2.0)


def _replace(path: Path, source: Path) -> None:
    """`path` takes `source`'s bytes as an editor would save it (a new file renamed over it), its mtime moved on."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(source, tmp)
    st = path.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    os.replace(tmp, path)


def _tensors(w: lora.LoraWeights) -> dict[str, torch.Tensor]:
    return {f"{t}.{k}.{ab}": getattr(m, ab) for t, part in w.parts.items() for k, m in part.modules.items()
            for ab in ("down", "up")}


def _same(a: lora.LoraWeights, b: lora.LoraWeights) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_file_is_parsed_once_per_version(pair, tmp_path):
    path = tmp_path / "style.safetensors"
    shutil.copyfile(pair[0], path)
    first = load_lora(path)
    assert load_lora(path) is first  # the same parse, not a second read of the file
    _replace(path, pair[1])  # new contents, new mtime
    second = load_lora(path)
    assert second is not first and _same(second, read_lora(pair[1])) and not _same(second, first)
    assert second.digest != first.digest and load_lora(path) is second


def test_another_name_of_the_file_shares_its_tensors_under_its_own_name(pair, tmp_path):
    real = tmp_path / "real.safetensors"
    shutil.copyfile(pair[0], real)
    alias = tmp_path / "alias.safetensors"
    alias.symlink_to(real)
    a, b = load_lora(real), load_lora(alias)
    assert (a.name, b.name) == ("real", "alias") and b.digest == a.digest
    assert {p.adapter for p in b.parts.values()} == {"alias"}
    assert all(b.parts[t].modules is a.parts[t].modules for t in a.parts)


def test_concurrent_first_reads_parse_once(pair):
    cache: LoraFileCache[lora.LoraWeights] = LoraFileCache()
    parses: list[int] = []

    def slow_read(path: Path) -> lora.LoraWeights:
        parses.append(1)
        time.sleep(0.2)  # long enough for every thread to ask while the first reads
        return read_lora(path)

    got: list[lora.LoraWeights] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(pair[0], slow_read))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(parses) == 1 and len(got) == 6 and all(w is got[0] for w in got)


def test_the_lru_is_bounded_by_count_and_bytes():
    lru: Lru[str, bytes] = Lru(max_entries=2)
    for k in "abc":
        lru.put(k, k.encode())
    assert lru.keys() == ["b", "c"] and lru.get("a") is None
    assert lru.get("b") == b"b"  # b is now the most recent: d pushes c out
    lru.put("d", b"d")
    assert lru.keys() == ["b", "d"]
    sized: Lru[str, bytes] = Lru(max_entries=10, max_bytes=10, size=len)
    sized.put("x", b"x" * 6)
    sized.put("y", b"y" * 6)  # 12 bytes: x goes
    assert sized.keys() == ["y"]
    sized.put("z", b"z" * 50)  # over the bound alone: still kept, as the newest
    assert sized.keys() == ["z"]


def test_the_file_cache_forgets_the_least_recently_used_file(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(lora.FILE_CACHE.lru, "max_entries", 2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}.safetensors")
        shutil.copyfile(pair[0], paths[-1])
    first = load_lora(paths[0])
    load_lora(paths[1])
    assert load_lora(paths[0]) is first  # still there (and now the most recent)
    load_lora(paths[2])  # pushes out f1, not f0
    assert load_lora(paths[0]) is first
    assert file_key(paths[1]) not in lora.FILE_CACHE.lru and file_key(paths[2]) in lora.FILE_CACHE.lru


def test_weights_key_is_the_content():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    same = {"b": torch.zeros(3, dtype=torch.bfloat16), "w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert weights_key(a) == weights_key(same)
    bumped = {**a, "w": a["w"].clone()}
    bumped["w"][1, 2] = torch.nextafter(bumped["w"][1, 2], torch.tensor(100.0))
    assert weights_key(bumped) != weights_key(a)
    assert weights_key({**a, "w": a["w"].reshape(3, 2)}) != weights_key(a)


def _image(pipe: Pipeline, adapter: Adapter | None) -> np.ndarray:
    req = Request(prompt="a red bicycle", steps=2, seed=7, height=64, width=64,
                  loras=(adapter,) if adapter else ())
    return pipe.run(req, progress=False)[0].pixels


def _counter(pipe: Pipeline, backend: str) -> int:
    return sum(getattr(r, "compiles" if backend == "openvino" else "sessions_made") for r in pipe.runners.values())


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_alternating_adapters_compile_each_once(backend, request, pair, monkeypatch):
    """A, B, A, B, none: the runners compile (OpenVINO) or make sessions (ONNX Runtime) for A and B once each; the
    kept forms give exactly the pixels of a runner that keeps nothing and compiles at every switch."""
    engines = request.getfixturevalue("ov_engines" if backend == "openvino" else "ort_engines")
    a, b = Adapter(pair[0], 0.8), Adapter(pair[1], 0.8)
    pipe = Pipeline.load(engines)
    try:
        base = _image(pipe, None)
        start = _counter(pipe, backend)
        got = [_image(pipe, x) for x in (a, b, a, b)]
        again = _image(pipe, None)
        touched = 2  # the UNet and the text encoder: both have weights in these adapters
        assert _counter(pipe, backend) - start == 2 * touched  # A and B once each; none: the built one, kept
    finally:
        pipe.close()
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[1], got[3]) and np.array_equal(again, base)
    assert max_diff(got[0], got[1]) > 2 and max_diff(got[0], base) > 2
    monkeypatch.setenv(VARIANTS_ENV, "1")  # keep nothing: a fresh compile at every switch
    fresh = Pipeline.load(engines)
    try:
        start = _counter(fresh, backend)
        want = [_image(fresh, x) for x in (a, b, a)]
        assert _counter(fresh, backend) - start == 3 * touched
    finally:
        fresh.close()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
