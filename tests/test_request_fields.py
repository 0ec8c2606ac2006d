"""A request's fields are listed once, on `engine.request.Request`: the CLI's flags and the server's JSON body
follow them. These tests hold the three identical, so a field added to Request without its flag or body field
fails here."""
from __future__ import annotations

import dataclasses

from engine.generate import GenerateConfig, parse_args
from engine.request import FLAGS, Request, RequestError, flag
from engine.server.schemas import GenerateBody

FIELDS = [f.name for f in dataclasses.fields(Request)]
CLI_ONLY = {"prompt": "several prompts, one request each"}  # the CLI's list of prompts -> one Request per prompt


def test_every_request_field_is_a_generate_body_field_of_the_same_name():
    body = set(GenerateBody.model_fields) - {"response_format", "stream", "preview_every"}  # how the answer is
    # written and delivered, not the request
    assert body == set(FIELDS)


def test_every_request_field_is_a_cli_flag(capsys):
    try:
        parse_args(["--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    missing = [name for name in FIELDS if flag(name) not in text.split()]
    assert not missing, missing
    assert set(FLAGS) <= set(FIELDS)  # every irregular flag names a real field


def test_the_cli_passes_every_field_to_the_request(tmp_path):
    """Non-default values for every field reach the Request (a field the CLI forgot keeps its default)."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    cfg = parse_args(["--prompt", "a", "--negative-prompt", "b", "--steps", "3", "--guidance-scale", "2",
                      "--scheduler", "ddim", "--seed", "5", "--height", "64", "--width", "128", "--images-per-prompt",
                      "2", "--init-image", "x.png", "--strength", "0.5", "--mask", "m.png", "--resize",
                      "--original-size", "1", "2", "--crop", "3", "4", "--target-size", "5", "6", "--aesthetic-score",
                      "7", "--negative-aesthetic-score", "8", "--lora", f"{lora}:0.5", "--controlnet", "edges",
                      "--control-image", "c.png", "--guess-mode", "--ip-image", "p.png", "--ip-scale", "0.5",
                      "--prompt-syntax", "plain", "--clip-skip", "2", "--vae-tiling", "on", "--vae-tile-size", "256",
                      "--vae-tile-overlap", "0.125", "--hires-scale", "2", "--hires-steps", "9", "--hires-strength",
                      "0.4", "--hires-upscaler", "lanczos", "--refiner-switch", "0.8",
                      "--noise-level", "100", "--eta", "0.5", "--class-label", "4",
                      "--semantic-map", "labels.png", "--layout", "layout.json",
                      "--semantic-palette", "palette.json", "--cache-interval", "3", "--cache-schedule", "center",
                      "--decoder", "tiny"])
    (req,) = cfg.requests()
    default = Request()
    unchanged = [f for f in FIELDS if getattr(req, f) == getattr(default, f)]
    assert not unchanged, unchanged
    assert isinstance(cfg, GenerateConfig)


def test_request_errors_name_their_field():
    bad = {"steps": 0, "guidance_scale": float("nan"), "images": 0, "seed": -5, "height": 0, "width": True,
           "crop": (1,), "original_size": (0, 1), "target_size": "x", "aesthetic_score": float("inf"),
           "negative_aesthetic_score": "2", "refiner_switch": 1.5, "noise_level": -1, "eta": 2.0,
           "class_label": True, "prompt": 7, "negative_prompt": b"x", "cache_interval": 0,
           "cache_schedule": "every"}
    for name, value in bad.items():
        try:
            Request(**{name: value}).check()
        except RequestError as e:
            assert e.field == name, (name, e.field, str(e))
        else:
            raise AssertionError(f"{name}={value!r} was accepted")


def test_a_random_seed_is_drawn_from_all_64_bits():
    seeds = [Request(seed=-1, images=3).resolved((0.8, 1.0)).seed for _ in range(16)]
    assert max(seeds) >= 2**32  # 32-bit draws would all be below it (chance of a false pass: 2**-512)
    assert all(0 <= s <= 2**64 - 3 for s in seeds)  # seed + images - 1 stays a valid 64-bit seed
