"""PNG output that carries its generation parameters (A1111-style `parameters` text + a JSON chunk)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def parameters_text(params: dict[str, Any]) -> str:
    """A1111-style 'parameters' text: prompt, then 'Key: value' pairs."""
    rest = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt"))
    return f"{params['prompt']}\nNegative prompt: {params.get('negative_prompt', '')}\n{rest}"


def save_png(image: np.ndarray, path: Path, params: dict[str, Any]) -> Path:
    """Write `image` ([H, W, 3] uint8) to `path` atomically, with its parameters in text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_itxt("sd_engine", json.dumps(params, ensure_ascii=False, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the image from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
