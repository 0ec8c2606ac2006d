"""Per-row, per-step tables among a denoise step's buffers (engine/denoise.py): `table.<name>`, [B, N].

With one step index for the batch (0-d, `Pipeline.run`) the step reads column idx on the device; with per-row
step indices [B] (step-level batching, engine/continuous.py, which knows each row's step on the host) the caller
passes each row's value at its own step, [B]. Either way no host sync inside the step. Torch-free to import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TABLE = "table."


def table_value(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Each row's value at this step, [B]: column i of a [B, N] table (0-d i), or the column itself (per-row i)."""
    if i.dim() == 0:
        return table.index_select(1, i.view(1))[:, 0]
    return table
