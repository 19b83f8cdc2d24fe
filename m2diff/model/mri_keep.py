"""The MRI keep mask of MRI-free mode (docs/METHOD.md section 2): which slices of a batch
see their T1. A dropped slice sees a zero T1, and M2Diff's MRI pathway is replaced by its
PET pathway there. The training draw (``diffusion.draw``), M2Diff's own default, the
baselines and the DP per-slice gradients (m2diff.privacy) all take the mask from here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def draw_keep(
    p_drop: float, batch: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """(B,) bool: each slice keeps its MRI with probability ``1 - p_drop``."""
    if generator is None:
        return torch.rand(batch, device=device) >= p_drop
    return torch.rand(batch, generator=generator, device=generator.device).to(device) >= p_drop


def keep_all(batch: int, device: torch.device) -> Tensor:
    """(B,) bool: every slice keeps its MRI (what ``keep=None`` means)."""
    return torch.ones(batch, dtype=torch.bool, device=device)


def masked_t1(t1: Tensor, keep: Tensor | None) -> Tensor:
    """``t1`` (B, C, H, W) with the slices that do not keep their MRI zeroed."""
    if keep is None:
        return t1
    return torch.where(keep.to(t1.device, torch.bool).view(-1, 1, 1, 1), t1, torch.zeros_like(t1))
