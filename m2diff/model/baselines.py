"""The two baselines of docs/METHOD.md section 2, behind the same interfaces as M2Diff.

- ``RegressionUNet`` (model=unet): MONAI's UNet, concat(LD, T1) -> SD, trained with MSE on SD.
- ``ConcatDDPM`` (model=ddpm_concat): one MONAI DiffusionModelUNet on concat(x_t, LD, T1), a
  single eps head (single-pathway conditioning, the "early fusion" M2Diff argues against).

Both take ``t1=None`` as a zero T1 image (the same as a dropped MRI in training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet, UNet
from torch import Tensor, nn

from m2diff.model.m2diff import ld_noise_level
from m2diff.model.mri_keep import masked_t1


def _t1_or_zeros(t1: Tensor | None, like: Tensor, mri_keep: Tensor | None) -> Tensor:
    if t1 is None:
        return torch.zeros_like(like)
    return masked_t1(t1, mri_keep)


class RegressionUNet(nn.Module):
    """Direct regression: forward(ld, t1=None) -> sd (B, 1, H, W).

    Predicts the residual SD - LD (added back here): LD is already close to SD, and residual
    learning converges much faster for the same budget. GroupNorm (not MONAI's default
    InstanceNorm) and a parameter-free activation keep it Opacus-compatible.
    """

    is_diffusion = False

    def __init__(self, channels: Sequence[int], num_res_blocks: int, norm_num_groups: int,
                 dropout: float, mri_dropout: float = 0.0) -> None:
        super().__init__()
        strides = [2] * (len(channels) - 1)
        self.stride = 2 ** len(strides)
        self.mri_dropout = float(mri_dropout)
        # MONAI's UNet normalises its top up-layer output, and GroupNorm cannot take 1 channel:
        # let it emit channels[0] features and map them to SD with a 1x1 conv.
        self.net = nn.Sequential(
            UNet(spatial_dims=2, in_channels=2, out_channels=channels[0], channels=list(channels),
                 strides=strides, num_res_units=num_res_blocks, act="SWISH",
                 norm=("group", {"num_groups": norm_num_groups}), dropout=dropout),
            nn.Conv2d(channels[0], 1, kernel_size=1),
        )

    def forward(self, ld: Tensor, t1: Tensor | None = None, mri_keep: Tensor | None = None) -> Tensor:
        t1 = _t1_or_zeros(t1, ld, mri_keep)
        return ld + self.net(torch.cat([ld, t1], dim=1))


class ConcatDDPM(nn.Module):
    """Single-pathway conditional DDPM: forward(x_t, t, ld, t1=None) -> eps, x_0 or v (the
    formulation's), (B, 1, H, W).

    MONAI's DiffusionModelUNet has no dropout option, so ``model.dropout`` does not apply here.
    With ``noise_cond`` the LD slice's noise level (``ld_noise_level``) is a fourth, constant
    input channel (MONAI's UNet takes no continuous conditioning in its embedding).
    """

    is_diffusion = True

    def __init__(self, channels: Sequence[int], attention_levels: Sequence[bool],
                 num_res_blocks: int, num_heads: int, norm_num_groups: int,
                 mri_dropout: float = 0.0, noise_cond: bool = False) -> None:
        super().__init__()
        self.stride = 2 ** (len(channels) - 1)
        self.mri_dropout = float(mri_dropout)
        self.noise_cond = bool(noise_cond)
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=4 if noise_cond else 3, out_channels=1,
            num_res_blocks=num_res_blocks,
            channels=list(channels), attention_levels=list(attention_levels),
            norm_num_groups=norm_num_groups, num_head_channels=[c // num_heads for c in channels])

    def forward(self, x_t: Tensor, t: Tensor, ld: Tensor, t1: Tensor | None = None,
                mri_keep: Tensor | None = None) -> Tensor:
        t1 = _t1_or_zeros(t1, ld, mri_keep)
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        inputs = [x_t, ld, t1]
        if self.noise_cond:
            inputs.append(ld_noise_level(ld).view(-1, 1, 1, 1).expand_as(ld))
        return self.unet(torch.cat(inputs, dim=1), t)
