"""Parts of the model presets shared by every preset module (export/presets.py, export/ldm_presets.py): a
diffusers UNet2DConditionModel's architecture and a folder's scheduler defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UNetArch:
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name; for SD 1.x it is the head *count*
    cross_attention_dim: int = 768
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False

    def config(self, latent_channels: int, sample_size: int, in_channels: int | None = None) -> dict:
        """diffusers UNet2DConditionModel kwargs; `in_channels` defaults to `latent_channels`."""
        c = asdict(self)
        c.update(in_channels=in_channels or latent_channels, out_channels=latent_channels, sample_size=sample_size)
        return c


@dataclass(frozen=True)
class SchedulerDefaults:
    """What a model folder's scheduler/scheduler_config.json says for this family."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    timestep_spacing: str = "leading"

    def config(self, prediction_type: str) -> dict:
        return dict(asdict(self), prediction_type=prediction_type, _class_name="DDIMScheduler")
