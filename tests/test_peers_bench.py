"""benchmarks/peers.py's pure parts: arguments, the suite dispatch, the round order, ratios, PSNR, reasons and rows.
Fast: no peer is installed or run."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import peer_children, peers
from benchmarks.peers import CONTESTANTS, Outcome


def test_peers_argv_takes_the_suite_out_or_says_none():
    assert peers.peers_argv(["--suite", "peers", "--size", "512"]) == ["--size", "512"]
    assert peers.peers_argv(["--size", "512", "--suite=peers"]) == ["--size", "512"]
    assert peers.peers_argv(["--suite", "quick"]) is None
    assert peers.peers_argv([]) is None
    assert peers.peers_argv(["--suite"]) is None


def test_parse_args_defaults_and_choices():
    a = peers.parse_args([])
    assert (a.model, a.size, a.steps, a.guidance, a.rounds) == ("sd15", 256, 20, 7.5, 2)
    assert [c.name for c in a.chosen] == list(CONTESTANTS)
    a = peers.parse_args(["--size", "512", "--contestants", "ours-openvino-bf16,diffusers-fp32"])
    assert a.size == 512 and [c.name for c in a.chosen] == ["diffusers-fp32", "ours-openvino-bf16"]  # table order
    for bad in (["--contestants", "nope"], ["--size", "100"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            peers.parse_args(bad)


def test_contestants_references_are_full_compute_counterparts():
    for c in CONTESTANTS.values():
        for ref in c.reference:
            r = CONTESTANTS[ref]
            assert r.kind == c.kind and not r.cached
    assert CONTESTANTS["diffusers-bf16-deepcache"].reference[0] == "diffusers-bf16"
    assert CONTESTANTS["ours-openvino-bf16-cached"].reference[0] == "ours-openvino-bf16"
    assert {c.cache_interval for c in CONTESTANTS.values() if c.cached} == {peers.CACHE_INTERVAL}


def test_schedule_interleaves_and_reverses_odd_rounds():
    assert peers.schedule(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]
    assert peers.schedule(["a"], 3) == [(0, "a"), (1, "a"), (2, "a")]


def test_ratios_against_best_peer_and_same_compute_peer():
    ips = {"diffusers-fp32": 0.1, "diffusers-bf16": 0.2, "diffusers-bf16-deepcache": 0.4, "sdcpp-f16": 0.25,
           "ours-openvino-bf16": 0.5, "ours-openvino-bf16-cached": 1.2}
    got = peers.ratios(ips)
    assert set(got) == {"ours-openvino-bf16", "ours-openvino-bf16-cached"}
    full = got["ours-openvino-bf16"]
    assert full["best_peer"] == "diffusers-bf16-deepcache" and full["ratio_to_best_peer"] == pytest.approx(1.25)
    assert full["best_same_compute_peer"] == "sdcpp-f16"
    assert full["ratio_to_best_same_compute_peer"] == pytest.approx(2.0)
    assert full["best_same_precision_peer"] == "diffusers-bf16"
    assert full["ratio_to_best_same_precision_peer"] == pytest.approx(2.5)
    cached = got["ours-openvino-bf16-cached"]
    assert cached["best_same_compute_peer"] == "diffusers-bf16-deepcache"
    assert cached["ratio_to_best_same_compute_peer"] == pytest.approx(3.0)
    assert cached["best_same_precision_peer"] == "diffusers-bf16-deepcache"
    assert "ratio_to_best_same_precision_peer" not in peers.ratios({"ours-openvino-fp32": 1.0, "sdcpp-f16": 2.0})[
        "ours-openvino-fp32"]  # no fp32 peer
    assert peers.ratios({"ours-openvino-fp32": 1.0}) == {"ours-openvino-fp32": {}}  # no peer measured: no ratio


def test_psnr_of_uint8_images():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    got = peers.psnr(a, b)
    mse = 255 ** 2 / a.size
    assert got["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / mse))
    assert got["max_abs_px"] == 255 and got["mean_abs_px"] == pytest.approx(255 / a.size)
    assert math.isinf(peers.psnr(a, a)["psnr_db"])
    with pytest.raises(ValueError, match="shapes"):
        peers.psnr(a, np.zeros((2, 2, 3), np.uint8))


def test_to_uint8_scales_floats_as_diffusers():
    x = np.array([[[0.0, 0.5, 1.0, 0.25]]], np.float32)
    assert peer_children.to_uint8(x).tolist() == [[[0, 128, 255]]]  # RGBA -> RGB, round(x * 255)


def test_tail_keeps_the_library_error_and_drops_traceback_frames():
    err = ("stable-diffusion.cpp:299  - get sd version from file failed: 'x.safetensors'\nloaded\n"
           "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    f()\n    ^^^\n"
           "RuntimeError: stable-diffusion.cpp made no image (NULL pointer access)\n")
    got = peers.tail(err)
    assert got.startswith("stable-diffusion.cpp:299  - get sd version from file failed")
    assert got.endswith("RuntimeError: stable-diffusion.cpp made no image (NULL pointer access)")
    assert "File" not in got


def test_rows_measured_skipped_ratios_and_psnr(tmp_path: Path):
    from benchmarks.schema import Results

    img = np.full((8, 8, 3), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "fp32.png")
    img[0, 0] = 110
    Image.fromarray(img).save(tmp_path / "bf16.png")
    outcomes = {
        "diffusers-fp32": Outcome(seconds=[4.0, 5.0], load_s=[2.0, 3.0], image=tmp_path / "fp32.png"),
        "diffusers-bf16": Outcome(seconds=[2.5, 2.0], load_s=[1.0, 1.0], image=tmp_path / "bf16.png"),
        "sdcpp-f16": Outcome(failed="stable_diffusion_cpp is not installed"),
        "ours-openvino-fp32": Outcome(seconds=[1.0], load_s=[1.0], image=tmp_path / "fp32.png",
                                      failed="round 2: exit 1: boom"),
    }
    a = peers.parse_args([])
    r = Results(suite="unit")
    peers.add_rows(r, a, outcomes)
    rows = {(x["config"]["contestant"], x["metric"], x["config"].get("reference")): x for x in r.rows}
    assert rows[("diffusers-bf16", "images_per_s", None)]["value"] == pytest.approx(0.5)  # the best round
    assert rows[("diffusers-fp32", "seconds_per_image", None)]["round_seconds"] == [4.0, 5.0]
    assert rows[("sdcpp-f16", None, None)]["skipped"] == "stable_diffusion_cpp is not installed"
    ours = rows[("ours-openvino-fp32", "ratio_to_best_peer", None)]
    assert ours["value"] == pytest.approx(2.0) and ours["peer"] == "diffusers-bf16"
    like = rows[("ours-openvino-fp32", "ratio_to_best_same_precision_peer", None)]
    assert like["value"] == pytest.approx(4.0) and like["peer"] == "diffusers-fp32"
    assert rows[("ours-openvino-fp32", "seconds_per_image", None)]["later_failure"] == "round 2: exit 1: boom"
    psnr = rows[("diffusers-bf16", "psnr_db", "diffusers-fp32")]["value"]
    assert psnr == pytest.approx(10 * math.log10(255 ** 2 / (3 * 100 / (8 * 8 * 3))))
    assert rows[("diffusers-bf16", "max_abs_px", "diffusers-fp32")]["value"] == 10
    assert not any(x["config"].get("reference") for x in r.rows if x["config"]["contestant"] == "diffusers-fp32")
    peers.print_table(r)  # renders without error
