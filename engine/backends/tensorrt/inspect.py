"""Pure-Python reading of TensorRT build facts: engine-inspector JSON (attention layers fused or plugged),
the ONNX side of the same question, and the version / GPU / plugin compatibility of a recorded engine.

Input: the string returned by `engine.create_engine_inspector().get_engine_information(
trt.LayerInformationFormat.JSON)` for an engine built with `ProfilingVerbosity.DETAILED`:

    {"Layers": [{"Name": "...", "LayerType": "...", "Inputs": [...], "Outputs": [...],
                 "TacticName": "...", "Metadata": "[ONNX Layer: ...]", ...}, ...],
     "Bindings": ["sample", ...]                  (TensorRT 10.x)
     "I/O Tensors": [{"Name": "sample", ...}, ...] (TensorRT 11.x replaces "Bindings")}

With the default LAYER_NAMES_ONLY verbosity "Layers" is a plain list of names; those are accepted too.

How attention shows up (from TensorRT's docs, trex and public engine dumps; never observed here):
- fused by TensorRT (decomposed MatMul-Softmax-MatMul, or the ONNX `Attention` op -> IAttention): a
  layer whose name or tactic names an MHA / flash kernel, e.g. `_gemm_mha_v2_myl0_12` (Myelin
  fMHA), `fmha...`, `..._flash_attention_...`, or whose type is an attention layer;
- an opaque Myelin region (LayerType "Myelin", name "{ForeignNode[...]}") may hide fused attention:
  counted apart as `opaque`, so "0 fused" is never claimed when TensorRT did not say;
- our kernel: a plugin layer (LayerType / ParameterType "PluginV3", "PluginV2", ...) whose name
  mentions the plugin name. The TensorRT backend prefixes plugin layer names with the plugin id
  before building, so this does not depend on how the exporter named the ONNX nodes.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Kernel / layer names of fused attention: _gemm_mha_v2, fmha_v2, fused_mha, mha_v1, flash_attention ...
_MHA = re.compile(r"(?:^|[^a-z])f?mha(?:$|[^a-z])|fused_?mha|flash_?att", re.IGNORECASE)
# Layer types (not names: ONNX names contain "attentions.0/...") of a fused attention layer.
_ATTENTION_TYPES = re.compile(r"attention|mha", re.IGNORECASE)
_TYPE_KEYS = ("LayerType", "ParameterType")

MANIFEST_KEY = "tensorrt"  # the TensorRT backend's build record in manifest.json
REBUILD_HINT = "rebuild with: python -m engine.build --backend tensorrt --force-rebuild"
ONNX_ATTENTION_MIN = (10, 14)  # ONNX `Attention` -> IAttention


@dataclass(frozen=True)
class AttentionSummary:
    layers: int  # engine layers in total
    fused: int  # attention kernels TensorRT fused (fMHA / flash / IAttention)
    plugged: int  # plugin layers of our kernel
    other_plugins: int  # plugin layers that are not ours
    opaque: int  # Myelin regions that do not list their kernels
    detailed: bool  # False: built without ProfilingVerbosity.DETAILED, counts are from names only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_layers(info: str | dict[str, Any] | list[Any]) -> list[dict[str, Any]]:
    """The "Layers" list as dicts; a bare name (LAYER_NAMES_ONLY) becomes {"Name": name}."""
    data = json.loads(info) if isinstance(info, str) else info
    if isinstance(data, dict):
        data = data.get("Layers", [])
    if not isinstance(data, list):
        raise ValueError(f"engine information has no 'Layers' list (got {type(data).__name__})")  # noqa: TRY004 - bad document
    return [item if isinstance(item, dict) else {"Name": str(item)} for item in data]


def io_tensor_names(info: str | dict[str, Any]) -> list[str]:
    """Engine I/O tensor names from "Bindings" (10.x) or "I/O Tensors" (11.x)."""
    data = json.loads(info) if isinstance(info, str) else info
    if "I/O Tensors" in data:
        return [str(t.get("Name", "")) for t in data["I/O Tensors"]]
    return [str(b) for b in data.get("Bindings", [])]


def _text(layer: dict[str, Any], keys: Iterable[str]) -> str:
    return " ".join(str(layer.get(k, "")) for k in keys)


def _type(layer: dict[str, Any]) -> str:
    return _text(layer, _TYPE_KEYS).strip()


def is_plugin(layer: dict[str, Any]) -> bool:
    return any(str(layer.get(k, "")).lower().startswith("plugin") for k in _TYPE_KEYS)


def is_ours(layer: dict[str, Any], plugin_name: str) -> bool:
    """A plugin layer whose name, plugin type or metadata mentions our plugin name."""
    needle = plugin_name.lower()
    return is_plugin(layer) and any(needle in str(v).lower() for v in layer.values() if isinstance(v, str))


def is_fused_attention(layer: dict[str, Any]) -> bool:
    if is_plugin(layer):
        return False
    if _ATTENTION_TYPES.search(_type(layer)):
        return True
    return bool(_MHA.search(_text(layer, ("Name", "TacticName"))))


def is_opaque_myelin(layer: dict[str, Any]) -> bool:
    return _type(layer).lower() == "myelin" or str(layer.get("Name", "")).startswith("{ForeignNode")


def summarize(info: str | dict[str, Any] | list[Any], plugin_name: str) -> AttentionSummary:
    layers = parse_layers(info)
    ours = sum(is_ours(layer, plugin_name) for layer in layers)
    return AttentionSummary(
        layers=len(layers),
        fused=sum(is_fused_attention(layer) for layer in layers),
        plugged=ours,
        other_plugins=sum(is_plugin(layer) for layer in layers) - ours,
        opaque=sum(is_opaque_myelin(layer) and not is_fused_attention(layer) for layer in layers),
        detailed=any(len(layer) > 1 for layer in layers),
    )


def onnx_summary(path: str | Path, plugin_id: str) -> tuple[dict[str, int], set[str], dict[str, str]]:
    """The ONNX side: (op counts, custom ops keyed 'domain::op'; names of `plugin_id` nodes;
    graph input/output name -> float dtype name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    names: set[str] = set()
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
        if key == plugin_id:
            names.add(n.name)
    floats = {int(onnx.TensorProto.FLOAT): "float32", int(onnx.TensorProto.FLOAT16): "float16",
              int(onnx.TensorProto.BFLOAT16): "bfloat16"}
    io = [*model.graph.input, *model.graph.output]
    dtypes = {t.name: floats[int(t.type.tensor_type.elem_type)] for t in io
              if int(t.type.tensor_type.elem_type) in floats}
    return counts, names, dtypes


def plugin_build_error(summary: AttentionSummary, plugin_name: str, expected: int | None = None) -> str | None:
    """Why a `plugin` attention build is unusable, or None when our plugin is in the engine."""
    if summary.plugged > 0:
        return None
    why = f"the engine has no '{plugin_name}' plugin layer"
    if expected == 0:
        why += " and the ONNX graph has no plugin node (no attention call had a supported head dim/dtype)"
    elif expected:
        why += f" although the ONNX graph has {expected} plugin node(s)"
    if summary.other_plugins:
        why += f"; it has {summary.other_plugins} other plugin layer(s)"
    return f"attention mode 'plugin': {why}. Rebuild with --attention decomposed, or check the kernel build"


# ---- build / load decisions on recorded facts (no TensorRT needed) ----------------------------------


def parse_version(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def network_typing(trt_version: str, precision: str) -> tuple[bool, bool]:
    """(strongly_typed, fp16_flag): TensorRT >= 11 is always strongly typed and has no FP16 flag;
    on 10.x an fp16 engine is a weakly typed network from the fp16 ONNX plus BuilderFlag.FP16."""
    if parse_version(trt_version)[:1] >= (11,):
        return True, False
    return False, precision == "fp16"


def attention_mode_error(mode: str, trt_version: str) -> str | None:
    if mode not in ("decomposed", "onnx", "plugin"):
        return f"unknown attention mode {mode!r}; choose decomposed, onnx or plugin"
    if mode == "onnx" and parse_version(trt_version)[:2] < ONNX_ATTENTION_MIN:
        need = ".".join(map(str, ONNX_ATTENTION_MIN))
        return f"attention 'onnx' needs TensorRT >= {need} (IAttention); installed {trt_version}. Use --attention decomposed"
    return None


def check_compat(manifest: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why an engine built as `manifest` cannot run in `current` (from current_environment()), or None."""
    built = manifest.get(MANIFEST_KEY)
    if not isinstance(built, dict):
        return f"cannot load this TensorRT engine: its manifest has no '{MANIFEST_KEY}' build record. {REBUILD_HINT}"
    problems = []
    if built.get("version") != current.get("version"):
        problems.append(f"it was built with TensorRT {built.get('version')} but TensorRT {current.get('version')} is installed")
    if built.get("compute_capability") != current.get("compute_capability"):
        problems.append(
            f"it was built for compute capability {built.get('compute_capability')} ({built.get('gpu')}) "
            f"but this GPU is {current.get('compute_capability')} ({current.get('gpu')})"
        )
    ptx, now = built.get("plugin_ptx_sha256"), current.get("plugin_ptx_sha256")
    if ptx and now and ptx != now:  # unknown now (plugin module absent): the engine still embeds its PTX
        problems.append(f"its attention plugin PTX has sha256 {ptx} but the installed kernel's is {now}")
    return f"cannot load this TensorRT engine: {'; '.join(problems)}. {REBUILD_HINT}" if problems else None
