"""Defaults for building and generating, in one place. The CLIs read these dataclasses.

`BuildConfig` is what the user asked for (CLI flags, `auto` values included); `BuildPlan` is what a
backend receives: every choice resolved (backend, device, precision, attention, profile).
Generation defaults live on `engine.request.Request`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.specs import Shape

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch", "openvino")
ATTENTION_MODES = ("auto", "decomposed", "onnx", "plugin")


@dataclass
class BuildConfig:
    model: str = "tiny"  # preset name or a local path (diffusers folder / .safetensors)
    backend: str = "auto"  # auto = tensorrt with a GPU, else onnxruntime; on a CPU: engine/backends/cpu_choice.py
    precision: str | None = None  # None = auto's pick, else the backend's default (fp16 on GPU backends, fp32 on CPU)
    attention: str = "auto"  # auto = the backend's preferred ONNX attention emission
    components: tuple[str, ...] | None = None  # None = the family's default (txt2img; + vae_encoder to inpaint)
    batch_size: int = 1  # images denoised together (before CFG doubling): the profile's opt batch
    height: int | None = None  # None = the model's default size
    width: int | None = None
    build_dynamic_shape: bool = False  # TensorRT: a range profile instead of a static shape
    min_batch: int = 1
    max_batch: int = 4
    min_size: int | None = None  # None = the model's dynamic range
    max_size: int | None = None
    engine_dir: Path = Path("engines")
    force_rebuild: bool = False
    verify: bool = False  # re-hash every cached file (also bytes altered with the mtime put back); rebuild mismatches
    timing_cache: Path | None = None  # TensorRT timing cache file, reused across builds
    workspace_gib: float = 8.0  # TensorRT builder workspace limit
    builder_optimization_level: int = 3  # TensorRT 0..5
    build_enable_refit: bool = False  # TensorRT: refittable engines, so LoRA adapters swap in without a rebuild
    device: str = "auto"  # torch / onnxruntime device: auto = cuda if available, else cpu
    compile: bool = False  # torch: torch.compile the UNet (inductor; channels_last on CUDA) when it is loaded
    controlnets: tuple[str, ...] = ()  # ControlNetModel folders or single-file ControlNets, each named by its stem
    ip_adapter: str | None = None  # an IP-Adapter .safetensors (published layout): image prompts
    image_encoder: str | None = None  # its CLIP vision encoder folder; None = image_encoder/ beside the file
    tiny_vae: str | None = None  # an AutoencoderTiny folder (TAESD / TAESDXL): previews, and --decoder tiny
    cache_branch: int | None = None  # feature caching (DeepCache): also build the UNet's shallow graph above this skip
    # branch (export/feature_cache.py); generate --cache-interval N uses it

    def __post_init__(self) -> None:
        self.engine_dir = Path(self.engine_dir)


@dataclass(frozen=True)
class Profile:
    """The image-level shape range an engine set accepts (inclusive); opt is the default shape."""

    lo: Shape
    opt: Shape
    hi: Shape

    def to_json(self) -> dict:  # a shape of one prompt chunk is written as before (earlier keys stay valid)
        return {k: {f: v for f, v in vars(getattr(self, k)).items() if f != "chunks" or v != 1}
                for k in ("lo", "opt", "hi")}

    @staticmethod
    def from_json(d: dict) -> Profile:
        return Profile(Shape(**d["lo"]), Shape(**d["opt"]), Shape(**d["hi"]))


@dataclass(frozen=True)
class BuildPlan:
    """A build with every choice resolved: what backends see (never the CLI config)."""

    backend: str
    device: str  # "cpu", "cuda", "cuda:1"
    precision: str  # "fp16" | "fp32" | "bf16" | "int8": one of the backend's `precisions` (checked in make_plan)
    attention: str  # "decomposed" | "onnx" | "plugin"
    profile: Profile
    engine_dir: Path
    timing_cache: Path | None = None
    workspace_gib: float = 8.0
    builder_optimization_level: int = 3
    enable_refit: bool = False  # TensorRT: BuilderFlag.REFIT
    compile: bool = False  # torch: torch.compile the UNet at load time (part of the artifact key when set)
