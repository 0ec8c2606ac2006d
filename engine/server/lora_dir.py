"""The server's --lora-dir: a request's adapter name -> a checked, parsed LoRA file inside that folder.

A name is the stem of a `.safetensors` file in the folder (LoraRef's pattern already refuses separators and dots
in front). Its resolved path must stay inside the resolved folder: a symlink that leads out of it is refused, as
if the name were unknown to the folder's contents but with its own message. The file is parsed (through
engine.lora's cache: once per version of the file) before the request is queued, so a file that is not a LoRA is
the client's 400 at once, not the whole batch's 500 later. Every message names the adapter by its name and never
carries a path of the server's disk (the folder's own name included); an unknown name does not list the folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from engine.lora import Adapter, load_lora
from engine.lora_cache import file_key

SUFFIX = ".safetensors"
LISTING_HINT = ("a name is the stem of a .safetensors file in that folder: list the folder's .safetensors files on "
                "the server, or ask its operator for them")
_PATHS = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"(),]*")  # what is left of a path once the known ones are replaced


class LoraDirError(ValueError):
    """A request's adapter this server will not use; the message starts with `loras:` and names no path."""


def adapter_in_dir(lora_dir: Path, name: str, scale: float) -> Adapter:
    """The Adapter for `name` in `lora_dir`, its file resolved, inside the folder and parsed as a LoRA; its path is
    the resolved one (what the pipeline reads is what was checked) and its version the file's key when checked."""
    root = lora_dir.resolve()
    lexical = lora_dir / f"{name}{SUFFIX}"
    try:
        resolved = lexical.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise LoraDirError(f"loras: no adapter {name!r} in this server's --lora-dir ({LISTING_HINT})") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission: the client cannot fix these
        raise LoraDirError(f"loras: adapter {name!r} cannot be opened on this server ({type(exc).__name__})") from None
    if not resolved.is_relative_to(root):
        raise LoraDirError(f"loras: adapter {name!r} is a link to a file outside this server's --lora-dir, "
                           "which is refused")
    if resolved.suffix.lower() != SUFFIX or not resolved.is_file():
        raise LoraDirError(f"loras: adapter {name!r} is not a .safetensors file")
    try:
        version = file_key(resolved)
        load_lora(resolved)  # parsed and checked now (cached), so the batch never meets a bad file
    except (OSError, ValueError) as exc:
        reason = _without_paths(str(exc), name, (resolved, lexical, root, lora_dir))
        raise LoraDirError(f"loras: adapter {name!r} is not a valid LoRA adapter: {reason}") from None
    return Adapter(resolved, scale, version)


def _without_paths(message: str, name: str, paths: tuple[Path, ...]) -> str:
    """`message` with the known paths replaced by the adapter's name, any other path-like text by `<path>`."""
    for p in sorted({str(p) for p in paths}, key=len, reverse=True):
        message = message.replace(f"LoRA {p!r}: ", "").replace(p, name)
    return _PATHS.sub("<path>", message)
