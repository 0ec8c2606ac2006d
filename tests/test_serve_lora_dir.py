"""The server's --lora-dir under hostile use: a symlink out of the folder is refused (the same file copied in works),
a file that is not a LoRA is a 400 naming the adapter without any path of the server, an unknown name is named
without listing the folder, a rewritten file is used at once, and `loras` can be sent in a multipart form (a JSON
field, checked as strictly as the JSON body's)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("peft")

from tests.helpers import max_diff, png_pixels, running_server, write_kohya  # noqa: E402

PROMPT = {"prompt": "a red bicycle", "steps": 2, "seed": 9}
DECOYS = [f"decoy_{i:02d}" for i in range(25)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(--lora-dir, a folder outside it). Inside: good (A), other (B), the decoys (copies of A), a link to a file
    outside, a copy of that same file, and files that are not LoRAs."""
    import torch
    from safetensors.torch import save_file

    lora_dir, outside = tmp_path_factory.mktemp("lora_dir"), tmp_path_factory.mktemp("outside")
    shutil.move(write_kohya(lora_dir, 51, r=4, alpha=2.0), lora_dir / "good.safetensors")
    shutil.move(write_kohya(lora_dir, 52, r=4, alpha=2.0), lora_dir / "other.safetensors")
    for name in DECOYS:
        shutil.copyfile(lora_dir / "good.safetensors", lora_dir / f"{name}.safetensors")
    secret = write_kohya(outside, 53, r=4, alpha=2.0)
    (lora_dir / "outlink.safetensors").symlink_to(secret)
    shutil.copyfile(secret, lora_dir / "copied.safetensors")
    (lora_dir / "garbage.safetensors").write_bytes(bytes(range(256)) * 16)  # header "size" 2^63-ish
    save_file({"model.diffusion_model.out.weight": torch.zeros(4, 4)}, str(lora_dir / "notlora.safetensors"))
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2),  # 1-d: no low-rank pair
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(3)},
              str(lora_dir / "flat.safetensors"))
    return lora_dir, outside


@pytest.fixture(scope="module")
def server(ort_engines, folders, tmp_path_factory):
    with running_server(ort_engines, tmp_path_factory.mktemp("serve_lora_dir"), "--lora-dir", str(folders[0])) as s:
        yield s


def _post(server, loras: list[dict]) -> tuple[int, dict]:
    status, data, _ = server.post("/v1/generate", {**PROMPT, "loras": loras})
    return status, json.loads(data)


def _pixels(answer: dict) -> np.ndarray:
    return png_pixels(answer["images"][0]["b64_png"])


def _image(server, name: str, scale: float = 0.8) -> np.ndarray:
    status, answer = _post(server, [{"name": name, "scale": scale}])
    assert status == 200, answer
    return _pixels(answer)


def _refused(server, name: str, folders) -> str:
    """The 400 for adapter `name`: OpenAI's error shape, param loras, naming `name` and no path of the server."""
    status, data, _ = server.post("/v1/generate", {**PROMPT, "loras": [{"name": name}]})
    text = data.decode()
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "loras", (status, error)
    assert repr(name) in error["message"], error
    assert "/" not in text and not any(str(p) in text for p in folders), text
    return error["message"]


def test_a_symlink_out_of_the_folder_is_refused_and_a_copy_inside_works(server, folders):
    message = _refused(server, "outlink", folders)
    assert "outside" in message
    copied = _image(server, "copied")
    assert max_diff(copied, _image(server, "good")) > 2  # the copy's own adapter, served


@pytest.mark.parametrize("name", ["garbage", "notlora", "flat"])
def test_a_file_that_is_not_a_lora_is_a_400_naming_it(server, folders, name):
    message = _refused(server, name, folders)
    assert "not a valid LoRA adapter" in message
    _image(server, "good")  # the server goes on serving


def test_an_unknown_name_is_named_without_listing_the_folder(server, folders):
    message = _refused(server, "nope", folders)
    assert "--lora-dir" in message and "stem of a .safetensors file" in message
    assert not any(name in message for name in ["good", "other", *DECOYS]), message


def test_a_rewritten_file_is_used_at_once(server, folders):
    lora_dir = folders[0]
    want_a, want_b = _image(server, "good"), _image(server, "other")
    swap = lora_dir / "swap.safetensors"
    shutil.copyfile(lora_dir / "good.safetensors", swap)
    assert np.array_equal(_image(server, "swap"), want_a)
    tmp = lora_dir / "swap.part"  # saved as an editor would: a new file renamed over the old, a later mtime
    shutil.copyfile(lora_dir / "other.safetensors", tmp)
    st = swap.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    os.replace(tmp, swap)
    assert np.array_equal(_image(server, "swap"), want_b)  # right after the old contents: no stale merge


def _multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "sdenginelorasboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _form(server, loras: str) -> tuple[int, dict]:
    body, ctype = _multipart({**{k: str(v) for k, v in PROMPT.items()}, "loras": loras})
    status, data, _ = server.post("/v1/generate", body, content_type=ctype)
    return status, json.loads(data)


def test_multipart_takes_loras_as_a_json_field(server, folders):
    loras = [{"name": "good", "scale": 0.8}, {"name": "other", "scale": -0.5}]
    status, answer = _post(server, loras)
    assert status == 200, answer
    status, form = _form(server, json.dumps(loras))
    assert status == 200, form
    assert np.array_equal(_pixels(form), _pixels(answer))
    for text, param in [("[{", "loras"), ('[{"name": "good", "scale": "0.8"}]', "loras.0.scale"),
                        ('{"name": "good"}', "loras"), ('[{"name": "good", "weight": 1}]', "loras.0.weight"),
                        ('[{"name": "../good"}]', "loras.0.name")]:
        status, error = _form(server, text)
        assert status == 400 and error["error"]["param"] == param, (text, error)
    status, error = _form(server, '[{"name": "outlink"}]')  # the folder's own checks, as for a JSON body
    assert status == 400 and "outside" in error["error"]["message"], error
