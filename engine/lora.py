"""LoRA adapters, the weights side: parse `path[:scale]`, load a `.safetensors` LoRA (diffusers/PEFT or
kohya-ss/A1111 keys, converted by diffusers' own converters), and merge it into torch modules with an exact undo.

A merge is W' = W + sum_i scale_i * factor_i * (B_i @ A_i), computed in float32 and cast to W's dtype, where
factor = alpha / r per module (alpha defaults to r when the file carries none, as PEFT does). `apply` keeps the
original tensors themselves, so `unapply` restores the model bit for bit (nothing is recomputed by subtraction).

`load_lora` parses a file once per version: parsed adapters are kept in a bounded LRU keyed by the file's resolved
path, size and mtime (engine/lora_cache.py), so a rewritten file is read again and an unchanged one never is.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.lora_cache import FILE_BYTES, FILES, FileKey, LoraFileCache, Lru
from export.errors import PICKLE_SUFFIXES, RequestError

TARGETS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Adapter:
    """One adapter as named on the command line: a `.safetensors` file and the strength to merge it with."""

    path: Path
    scale: float = 1.0
    version: FileKey | None = None  # the file as it was checked (the server's): a rewritten file is another Adapter


def parse_adapter(text: str) -> Adapter:
    """`path[:scale]` -> Adapter. The last ':' splits off a scale only when a float follows it."""
    path_text, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
            path_text = head
        except ValueError:
            if head.lower().endswith(".safetensors"):  # a file, then something that is not a scale
                raise ValueError(f"LoRA {text!r}: scale {tail!r} is not a number (PATH[:SCALE], e.g. "
                                 f"{head}:0.8)") from None
    if not math.isfinite(scale):
        raise ValueError(f"LoRA {text!r}: scale {tail!r} is not a finite number")
    if not path_text:
        raise ValueError(f"LoRA {text!r}: no file named")
    path = Path(path_text).expanduser()
    check_lora_file(path)
    return Adapter(path=path, scale=scale)


def check_lora_file(path: Path) -> None:
    """Refuse pickles and anything that is not an existing `.safetensors` file, naming the value."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"LoRA {str(path)!r}: {suffix} is a pickle (it can run code when loaded); "
                         "convert it to .safetensors")
    if suffix != ".safetensors":
        raise ValueError(f"LoRA {str(path)!r}: expected a .safetensors file")
    if not path.is_file():
        raise ValueError(f"LoRA {str(path)!r}: no such file")


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update of one module's `weight`."""

    down: torch.Tensor  # A [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor  # B [out, r] (Linear) or [out, r, 1, 1] (Conv2d)
    factor: float  # alpha / r

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraPart:
    """The modules of one adapter that touch one sub-model, keyed by module path relative to that sub-model."""

    adapter: str  # the adapter's name, for error messages
    target: str  # "unet" | "text_encoder" | "text_encoder_2"
    modules: dict[str, LoraModule] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraWeights:
    """A loaded adapter: its parts per sub-model, its name (file stem) and content hash (sha256, 12 hex)."""

    name: str
    digest: str
    path: Path
    parts: dict[str, LoraPart]


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_lora(path: Path | str) -> LoraWeights:
    """A LoRA `.safetensors` read through diffusers' converters (kohya/A1111 keys and alphas included), parsed once
    per version of the file (FILE_CACHE); ValueError naming the path for anything that is not such a LoRA."""
    path = Path(path)
    check_lora_file(path)
    try:
        weights = FILE_CACHE.get(path, read_lora)
    except OSError as exc:  # gone or unreadable between the check and the read
        raise ValueError(f"LoRA {str(path)!r}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return weights if weights.name == path.stem else _renamed(weights, path)


def read_lora(path: Path) -> LoraWeights:
    """`load_lora` without the cache: the header checked by safetensors itself first, then diffusers' loader with
    pickles off (a file it cannot read is an error, never a reason to try torch.load)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):  # the header only: size, JSON, offsets
            pass
        out = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), use_safetensors=True,
                                                             return_lora_metadata=True)
        raw, alphas = out[0], out[1] or {}
        metadata = (out[2] if len(out) > 2 else None) or {}
        parts: dict[str, LoraPart] = {}
        for target in TARGETS:
            sub = {k.removeprefix(f"{target}."): v for k, v in raw.items() if k.startswith(f"{target}.")}
            if sub:
                sub_alphas = {k.removeprefix(f"{target}."): float(v) for k, v in alphas.items()
                              if k.split(".")[0] == target}
                sub_meta = {k.removeprefix(f"{target}."): v for k, v in metadata.items()
                            if k.startswith(f"{target}.")}
                parts[target] = LoraPart(path.stem, target, _modules(target, sub, sub_alphas, sub_meta, path))
    except (SafetensorError, OSError, KeyError, IndexError, TypeError, RuntimeError, AttributeError) as exc:
        raise ValueError(f"LoRA {str(path)!r}: not a readable LoRA .safetensors ({_reason(exc)})") from None
    unknown = sorted({k.split(".")[0] for k in raw} - set(TARGETS))
    if unknown or not parts:
        raise ValueError(f"LoRA {str(path)!r}: no Stable Diffusion LoRA keys (found prefixes {unknown})")
    return LoraWeights(name=path.stem, digest=file_digest(path), path=path, parts=parts)


def _reason(exc: BaseException) -> str:
    """The innermost cause's message, on one line (diffusers wraps safetensors' header errors in an OSError)."""
    for _ in range(8):  # a chain is short; bounded all the same
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _renamed(weights: LoraWeights, path: Path) -> LoraWeights:
    """The cached adapter under the name and path it was asked for (another name of the same file): the tensors
    are shared."""
    parts = {t: LoraPart(path.stem, t, p.modules) for t, p in weights.parts.items()}
    return LoraWeights(name=path.stem, digest=weights.digest, path=path, parts=parts)


def lora_bytes(weights: LoraWeights) -> int:
    """The tensor bytes an adapter holds (what FILE_CACHE is bounded by)."""
    return sum(m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()
               for part in weights.parts.values() for m in part.modules.values())


FILE_CACHE: LoraFileCache[LoraWeights] = LoraFileCache(Lru(max_entries=FILES, max_bytes=FILE_BYTES, size=lora_bytes))


def _to_peft(target: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-format keys of one sub-model -> PEFT keys (`<module>.lora_A.weight`), as diffusers loads them."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if target == "unet":
        return sd if any("lora_A" in k for k in sd) else convert_unet_state_dict_to_peft(sd)
    # kohya text-encoder attention keys come out as old diffusers names (`to_q_lora`); say so rather than let the
    # converter guess from the whole dict (it only recognises them when an `to_out_lora` key is present)
    old = StateDictType.DIFFUSERS_OLD if any("_lora.down." in k for k in sd) else None
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd, original_type=old))


def _modules(target: str, sd: dict[str, torch.Tensor], alphas: dict[str, float], meta: dict, path: Path
             ) -> dict[str, LoraModule]:
    """Group PEFT keys into LoraModules with their alpha / r factor."""
    peft = _to_peft(target, sd)
    bad = sorted(k for k in peft if not re.search(r"\.lora_[AB]\.weight$", k))
    if bad or meta.get("use_dora") or meta.get("lora_bias"):
        raise ValueError(f"LoRA {str(path)!r}: unsupported keys or options for {target} (DoRA, LoRA bias, "
                         f"other adapter types): {bad[:3]}")
    module_alpha = _alphas_by_module(sd, peft, alphas)
    modules: dict[str, LoraModule] = {}
    for key in sorted(k for k in peft if k.endswith(".lora_A.weight")):
        name = key.removesuffix(".lora_A.weight")
        up_key = f"{name}.lora_B.weight"
        if up_key not in peft:
            raise ValueError(f"LoRA {str(path)!r}: {target} key {key!r} has no matching lora_B")
        down, up = peft[key], peft[up_key]
        _check_pair(target, key, down, up, path)
        modules[name] = LoraModule(down=down, up=up, factor=_factor(name, int(down.shape[0]), module_alpha, meta))
    return modules


def _check_pair(target: str, key: str, down: torch.Tensor, up: torch.Tensor, path: Path) -> None:
    """A and B of one module: floating point, 2-d (Linear) or 4-d (Conv2d, B 1x1), B's columns = A's rows (the rank)."""
    fits = (down.dim() in (2, 4) and up.dim() in (2, 4) and down.is_floating_point() and up.is_floating_point()
            and down.shape[0] > 0 and up.shape[1] == down.shape[0] and (up.dim() == 2 or up.shape[2:] == (1, 1)))
    if not fits:
        raise ValueError(f"LoRA {str(path)!r}: {target} key {key!r} is not a low-rank pair (A {tuple(down.shape)} "
                         f"{down.dtype}, B {tuple(up.shape)} {up.dtype})")


def _alphas_by_module(raw: dict[str, torch.Tensor], peft: dict[str, torch.Tensor], alphas: dict[str, float]
                      ) -> dict[str, float]:
    """Network alphas are keyed by diffusers' intermediate names; follow each to its down tensor, whose PEFT key
    (the converters only rename, so the tensor object is the same) names the module."""
    peft_name = {id(v): k.rsplit(".lora_", 1)[0] for k, v in peft.items()}
    downs = [k for k in raw if k.endswith(("down.weight", "lora_A.weight"))]
    out: dict[str, float] = {}
    for key, alpha in alphas.items():
        base = key.removesuffix(".alpha")
        match = [k for k in downs if k == base or k.startswith(f"{base}.")]
        if len(match) != 1 or id(raw[match[0]]) not in peft_name:
            raise ValueError(f"LoRA alpha {key!r} matches no single down weight")
        out[peft_name[id(raw[match[0]])]] = alpha
    return out


def _factor(name: str, rank: int, module_alpha: dict[str, float], meta: dict) -> float:
    """alpha / r: the file's own alpha for the module, else PEFT metadata (alpha_pattern, lora_alpha), else r."""
    alpha = module_alpha.get(name)
    if alpha is None and meta.get("lora_alpha") is not None:
        pattern = next((p for p in meta.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({p})$", name)), None)
        alpha = float(meta["alpha_pattern"][pattern] if pattern is not None else meta["lora_alpha"])
    if alpha is None:
        return 1.0
    return alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank


def delta(weight_shape: torch.Size | Sequence[int], down: torch.Tensor, up: torch.Tensor, factor: float
          ) -> torch.Tensor:
    """factor * B @ A in float32, shaped like the weight: [out, in] (Linear) or [out, in, kh, kw] (Conv2d)."""
    prod = up.float().flatten(1) @ down.float().flatten(1)  # [out, in * kh * kw]
    shape = torch.Size(weight_shape)
    if prod.numel() != shape.numel() or prod.shape[0] != shape[0]:
        raise ValueError(f"LoRA of shape B {tuple(up.shape)} @ A {tuple(down.shape)} does not fit weight "
                         f"{tuple(shape)}")
    return (prod * factor).reshape(shape)


def _resolve(names: Container[str], key: str) -> str | None:
    """The weight name of module `key` among `names`, or None (CLIP's `text_model.` prefix differs across
    transformers versions)."""
    for candidate in (key, key.removeprefix("text_model."), f"text_model.{key}"):
        if f"{candidate}.weight" in names:
            return f"{candidate}.weight"
    return None


def merged_tensors(weights: Mapping[str, torch.Tensor], loras: Sequence[tuple[LoraPart, float]],
                   owner: str = "the model") -> dict[str, torch.Tensor]:
    """{weight name: W + sum(scale * factor * B @ A)} for every weight the adapters touch, in W's dtype and
    device; `weights` maps a sub-model's parameter names to tensors (only the touched ones are read).

    Modules of an adapter that the model lacks are ignored with a warning that counts them; an adapter none of
    whose modules match is refused (ValueError naming one), as is a module whose shape does not fit."""
    acc: dict[str, torch.Tensor] = {}  # float32 sums
    dtypes: dict[str, torch.dtype] = {}
    for part, scale in loras:
        missing = [key for key in part.modules if _resolve(weights, key) is None]
        if len(missing) == len(part.modules):
            raise ValueError(f"LoRA {part.adapter!r}: none of its {len(missing)} {part.target} modules is in "
                             f"{owner} (e.g. {missing[0]!r}, which {owner} lacks): an adapter for another architecture?")
        if missing:
            warnings.warn(f"LoRA {part.adapter!r}: {len(missing)} of {len(part.modules)} {part.target} modules match "
                          f"nothing in {owner} and are ignored (e.g. {missing[0]!r})", stacklevel=2)
        for key, mod in part.modules.items():
            name = _resolve(weights, key)
            if name is None:
                continue
            if name not in acc:
                weight = weights[name]
                acc[name], dtypes[name] = weight.detach().float(), weight.dtype
            w = acc[name]
            try:
                d = delta(w.shape, mod.down.to(w.device), mod.up.to(w.device), mod.factor)
            except ValueError as e:
                raise ValueError(f"LoRA {part.adapter!r} {part.target} key {key!r}: {e}") from None
            acc[name] = w + scale * d
    return {name: w.to(dtypes[name]) for name, w in acc.items()}


def merged_weights(model: nn.Module, loras: Sequence[tuple[LoraPart, float]]) -> dict[str, torch.Tensor]:
    """`merged_tensors` over a module's parameters."""
    return merged_tensors(dict(model.named_parameters()), loras, type(model).__name__)


class AppliedLora:
    """Merged weights swapped into modules; `unapply()` puts the original tensors back (bit-identical)."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its original data)

    def swap(self, model: nn.Module, merged: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        for name, tensor in merged.items():
            param = params[name]
            self._saved.append((param, param.data))
            param.data = tensor

    def unapply(self) -> None:
        for param, original in reversed(self._saved):
            param.data = original
        self._saved.clear()

    def __enter__(self) -> AppliedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unapply()


def apply(model: nn.Module, loras: Sequence[tuple[LoraPart, float]]) -> AppliedLora:
    """Merge `loras` (part, scale) into `model` in place; the returned handle undoes it exactly."""
    handle = AppliedLora()
    handle.swap(model, merged_weights(model, loras))
    return handle


def parts_for(loras: Sequence[tuple[LoraWeights, float]], target: str) -> list[tuple[LoraPart, float]]:
    """(part, scale) of every adapter that touches sub-model `target`."""
    return [(w.parts[target], s) for w, s in loras if target in w.parts]


def merged_runners(adapters: Sequence[Adapter], runners: Mapping[str, Any], spec: Callable[[str], Any],
                   model: str | None) -> tuple[dict[str, dict[str, torch.Tensor] | None], list]:
    """(runner name -> its weights with `adapters` merged, None where no adapter touches it; the loaded adapters and
    scales), every adapter loaded and checked against every runner first; RequestError naming `loras` for weights
    of a sub-model none of `runners` (their `spec(name).model_folder`) holds."""
    loaded = [(load_lora(a.path), float(a.scale)) for a in adapters]
    folders: dict[str, list[str]] = {}  # several runners of one sub-model: the UNet and its shallow graph
    for name in runners:
        folders.setdefault(spec(name).model_folder, []).append(name)
    merged: dict[str, dict[str, torch.Tensor] | None] = {}
    for target in TARGETS:
        parts = parts_for(loaded, target)
        if parts and target not in folders:
            raise RequestError("loras", f"LoRA {parts[0][0].adapter!r} has {target} weights, which model {model!r} has "
                                        "no engine for")
        if target in folders:  # merged once, into the graph with every weight; the others take their share
            whole, *parts_of = sorted(folders[target], key=lambda n: -len(runners[n].base_weights()))
            merged[whole] = merged_tensors(runners[whole].base_weights(), parts, target) if parts else None
            for name in parts_of:
                has = runners[name].base_weights()
                merged[name] = None if merged[whole] is None else {k: v for k, v in merged[whole].items() if k in has}
    return merged, loaded


def adapter_params(loras: Sequence[tuple[LoraWeights, float]]) -> list[dict]:
    """What an image records of its adapters: name, content hash, scale (PNG metadata)."""
    return [{"name": w.name, "hash": w.digest, "scale": s} for w, s in loras]


class OnnxWeights(Mapping[str, torch.Tensor]):
    """An exported graph's weights by the sub-model's parameter names: export names each initializer after its torch
    parameter under the wrapper's attribute (`unet.conv_in.weight`), and `prefix` is that attribute."""

    def __init__(self, path: Path):
        import onnx_ir as ir

        self.model = ir.load(path)  # external data stays on disk until a tensor is read
        inits = self.model.graph.initializers
        heads = {n.split(".", 1)[0] for n in inits if "." in n}
        self.prefix = f"{min(heads)}." if len(heads) == 1 else ""
        self.names = {n.removeprefix(self.prefix): n for n in inits if n.startswith(self.prefix) and "." in n}

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.model.graph.initializers[self.names[name]].const_value
        assert value is not None
        return torch.from_numpy(value.numpy().copy())

    def external(self, name: str) -> bool:
        import onnx_ir as ir

        return isinstance(self.model.graph.initializers[self.names[name]].const_value, ir.ExternalTensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
