"""AUTOMATIC1111's infotext read back with A1111's own rules (modules/infotext_utils.py of stable-diffusion-webui),
a txt2img request's image parameters to write it from, and the sampler record an A1111 `Sampler:` value names;
shared by tests/test_png.py and tests/test_sampler_registry.py."""
from __future__ import annotations

import json
import re

from engine.sampler_registry import REGISTRY, Sampler

# modules/infotext_utils.py of stable-diffusion-webui: the `Key: value` pattern and the size pattern
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

TXT2IMG = {"prompt": "a cat", "negative_prompt": "", "steps": 25, "guidance_scale": 7.5, "sampler": "dpmpp_2m",
           "seed": 0, "height": 512, "width": 768, "index": 0, "kind": "txt2img", "model": "tiny",
           "backend": "onnxruntime", "precision": "fp32", "cuda_graph": False}


def a1111_unquote(text: str) -> str:
    """infotext_utils.unquote: JSON-decode a quoted value, else keep it."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_a1111(text: str) -> dict[str, str]:
    """infotext_utils.parse_generation_parameters, reduced to what it does with the text itself."""
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(lastline):
        if v[:1] == '"' and v[-1:] == '"':
            v = a1111_unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def by_a1111_name(a1111_name: str) -> Sampler:
    """The sampler record whose A1111 infotext name is `a1111_name` (reading an A1111 `Sampler:` value back)."""
    for sampler in REGISTRY.values():
        if sampler.a1111_name == a1111_name:
            return sampler
    raise ValueError(f"unknown A1111 sampler {a1111_name!r}; "
                     f"choose one of: {', '.join(s.a1111_name for s in REGISTRY.values())}")
