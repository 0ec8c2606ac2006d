"""Defaults for building and generating, in one place. The CLIs read these dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.specs import TXT2IMG_COMPONENTS, Shape

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
ATTENTION_MODES = ("auto", "decomposed", "onnx", "plugin")


@dataclass
class BuildConfig:
    model: str = "tiny"  # preset name or a local path (diffusers folder / .safetensors)
    backend: str = "auto"  # auto = tensorrt if importable with a GPU, else onnxruntime
    precision: str | None = None  # None = the backend's default (fp16 on GPU backends, fp32 on CPU)
    attention: str = "auto"  # auto = the backend's preferred ONNX attention emission
    components: tuple[str, ...] = TXT2IMG_COMPONENTS
    batch_size: int = 1
    height: int | None = None  # None = the model's default size
    width: int | None = None
    build_dynamic_shape: bool = False
    min_batch: int = 1
    max_batch: int = 4
    min_size: int | None = None  # None = the model's dynamic range
    max_size: int | None = None
    engine_dir: Path = Path("engines")
    force_rebuild: bool = False
    timing_cache: Path | None = None  # TensorRT timing cache file, reused across builds
    workspace_gib: float = 8.0  # TensorRT builder workspace limit
    builder_optimization_level: int = 3  # TensorRT 0..5
    device: str = "auto"  # torch / onnxruntime device: auto = cuda if available, else cpu


@dataclass(frozen=True)
class Profile:
    """The image-level shape range an engine set was built for (inclusive)."""

    lo: Shape
    opt: Shape
    hi: Shape

    def to_json(self) -> dict:
        return {k: vars(getattr(self, k)) for k in ("lo", "opt", "hi")}

    @staticmethod
    def from_json(d: dict) -> "Profile":
        return Profile(Shape(**d["lo"]), Shape(**d["opt"]), Shape(**d["hi"]))


@dataclass
class GenerateConfig:
    prompt: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "dpmpp_2m"
    seed: int = 0
    height: int | None = None  # None = the built profile's opt size
    width: int | None = None
    batch_size: int = 1
    output: Path = Path("out")
    model: str = "tiny"
    engine_dir: Path = Path("engines")
    backend: str = "auto"
