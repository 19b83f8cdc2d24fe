"""Small in-memory fixtures for the model and training tests (no files, no data layer I/O)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from m2diff.config import compose
from m2diff.data.dataset import SliceSet

ARCHS = ("tiny", "unet", "ddpm_concat")


def cfg_for(model: str = "tiny", *overrides: str):
    return compose([f"model={model}", "device=cpu", *overrides])


def fake_slices(n: int = 4, h: int = 16, w: int = 16, seed: int = 0, t1: bool = True) -> SliceSet:
    """Smooth SD patterns, LD = SD + noise, T1 = a mask of SD: learnable and cheap."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    sd = np.stack([np.sin(3 * xx * (i + 1)) * np.cos(2 * yy) for i in range(n)])[:, None]
    sd = sd.astype(np.float32)
    ld = (sd + 0.2 * rng.standard_normal(sd.shape)).astype(np.float32)
    return SliceSet(ld=ld, t1=(sd > 0).astype(np.float32) if t1 else None, sd=sd,
                    subject=np.zeros(n, int), z=np.arange(n), subjects=[], site="fake")


def batch(b: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, 1, h, w, generator=g) for k in ("ld", "t1", "sd")}


def randomize_zero_params(model: nn.Module, seed: int = 0) -> nn.Module:
    """MONAI zero-initialises each block's last conv and the output conv, which makes every
    input irrelevant at step 0; give those weights small random values for wiring tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model
