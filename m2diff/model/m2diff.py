"""M2Diff: the dual-pathway (PET + MRI) conditional diffusion network of docs/METHOD.md section 2.

Two encoder-decoder UNets built from MONAI's diffusion blocks share one timestep embedding:

- PET pathway: input concat(x_t, LD) (2 ch), self-attention at ``attention_levels``.
- MRI pathway: input concat(x_t, T1) (2 ch), residual blocks only.
- Hierarchical fusion: every residual block of *both* decoders reads
  concat(own hidden state, PET-encoder skip, MRI-encoder skip) at its resolution.
- Two heads, eps_pet and eps_mri, both predicting the noise of the SD-PET diffusion.
- MRI-free mode: per sample, the MRI encoder's outputs (bottleneck and skips) are replaced
  by copies of the PET encoder's, so one set of weights also enhances scans without MRI.
- Optional (``noise_cond``, not the paper's): the LD slice's own noise level
  (``ld_noise_level``, a proxy for its dose) is embedded and added to the timestep embedding.

Opacus-friendly by construction: GroupNorm only, no in-place ops, each module called once
per forward, per-sample masking with ``torch.where`` (no batch mixing), and in a training
forward every parameter takes part in the graph (dropped samples still run the MRI encoder
on a zeroed T1; ``torch.where`` gives those samples zero gradient there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    WrappedUpsample,
    get_timestep_embedding,
    zero_module,
)
from torch import Tensor, nn

from m2diff.model.mri_keep import draw_keep, keep_all, masked_t1


def _conv(in_ch: int, out_ch: int, kernel: int = 3) -> Convolution:
    return Convolution(spatial_dims=2, in_channels=in_ch, out_channels=out_ch, strides=1,
                       kernel_size=kernel, padding=kernel // 2, conv_only=True)


def ld_noise_level(ld: Tensor, brain: float = -0.8) -> Tensor:
    """(B,) log noise level of LD slices (B, 1, H, W) (model space, H and W even), from the
    image itself: the mean |diagonal Haar detail| (a - b - c + d) / 2 of the 2 x 2 blocks
    whose four pixels are all brain (> ``brain``; -1 is zero activity), plus 1e-3, logged.

    Tracks the dose: on the benchmark's sites the per-slice medians are -2.9 (1/4 dose),
    -2.35 (1/20) and -1.8 (1/100), with no overlap of their 5-95 % ranges. Differentiable
    in nothing that trains and free of data-dependent shapes (vmap-safe for DP).
    """
    a, b = ld[..., 0::2, 0::2], ld[..., 0::2, 1::2]
    c, d = ld[..., 1::2, 0::2], ld[..., 1::2, 1::2]
    detail = (a - b - c + d).abs() / 2
    inside = (torch.minimum(torch.minimum(a, b), torch.minimum(c, d)) > brain).to(ld.dtype)
    level = (detail * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)).clamp_min(1.0)
    return torch.log(level + 1e-3)


class ResBlock(DiffusionUNetResnetBlock):
    """MONAI's timestep-conditioned residual block, plus dropout before its last conv.

    MONAI's block has no dropout; the authors train with 0.2 (placed as in Ho et al.'s DDPM).
    (B, in_ch, H, W), (B, temb) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, dropout: float) -> None:
        super().__init__(spatial_dims=2, in_channels=in_ch, temb_channels=temb_ch,
                         out_channels=out_ch, norm_num_groups=groups)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        return self.skip_connection(x) + h


class Stage(nn.Module):
    """One residual block, optionally followed by multi-head spatial self-attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, dropout: float,
                 heads: int = 0) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_ch, groups, dropout)
        self.attn = (SpatialAttentionBlock(spatial_dims=2, num_channels=out_ch,
                                           num_head_channels=out_ch // heads, norm_num_groups=groups)
                     if heads else None)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.res(h, emb)
        return self.attn(h).contiguous() if self.attn is not None else h


class Encoder(nn.Module):
    """conv_in, then per level ``num_res_blocks`` stages and a strided-conv downsample.

    forward: x (B, in_ch, H, W) -> (h (B, C_last, H/s, W/s), skips) with s = 2**(levels-1);
    skips are the conv_in output, every stage output and every downsample output, in order.
    ``skip_channels`` lists their channel counts.
    """

    def __init__(self, in_ch: int, channels: Sequence[int], attention: Sequence[bool],
                 num_res_blocks: int, temb_ch: int, groups: int, dropout: float, heads: int) -> None:
        super().__init__()
        self.conv_in = _conv(in_ch, channels[0])
        self.skip_channels = [channels[0]]
        blocks: list[nn.Module] = []
        ch = channels[0]
        for level, out_ch in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks.append(Stage(ch, out_ch, temb_ch, groups, dropout, heads if attention[level] else 0))
                ch = out_ch
                self.skip_channels.append(ch)
            if level < len(channels) - 1:
                blocks.append(DiffusionUnetDownsample(2, ch, use_conv=True, out_channels=ch))
                self.skip_channels.append(ch)
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = ch

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for block in self.blocks:
            h = block(h, emb)
            skips.append(h)
        return h, skips


class FusionDecoder(nn.Module):
    """Mid block, then per level (coarse to fine) ``num_res_blocks + 1`` fusion stages and an
    upsample, then the eps head.

    Every stage reads concat(h, pet_skip, mri_skip), consuming the two encoders' skips from the
    last one backwards (the usual UNet pairing, once per encoder).
    forward: h (B, C_last, H/s, W/s), two skip lists as from ``Encoder`` -> eps (B, 1, H, W).
    """

    def __init__(self, channels: Sequence[int], attention: Sequence[bool], num_res_blocks: int,
                 skip_channels: Sequence[int], temb_ch: int, groups: int, dropout: float,
                 heads: int) -> None:
        super().__init__()
        top = channels[-1]
        self.mid = nn.ModuleList([
            Stage(top, top, temb_ch, groups, dropout, heads if attention[-1] else 0),
            Stage(top, top, temb_ch, groups, dropout),
        ])
        skips = list(skip_channels)
        blocks: list[nn.Module] = []
        ch = top
        for level in reversed(range(len(channels))):
            out_ch = channels[level]
            for _ in range(num_res_blocks + 1):
                skip = skips.pop()
                blocks.append(Stage(ch + 2 * skip, out_ch, temb_ch, groups, dropout,
                                    heads if attention[level] else 0))
                ch = out_ch
            if level > 0:
                blocks.append(WrappedUpsample(spatial_dims=2, mode="nontrainable", in_channels=ch,
                                              out_channels=ch, interp_mode="nearest",
                                              scale_factor=2.0, post_conv=_conv(ch, ch),
                                              align_corners=None))
        assert not skips, "every encoder skip must be fused exactly once"
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(nn.GroupNorm(groups, ch, eps=1e-6), nn.SiLU(),
                                 zero_module(_conv(ch, 1)))

    def forward(self, h: Tensor, pet_skips: list[Tensor], mri_skips: list[Tensor], emb: Tensor) -> Tensor:
        for stage in self.mid:
            h = stage(h, emb)
        i = len(pet_skips)
        for block in self.blocks:
            if isinstance(block, Stage):
                i -= 1
                h = block(torch.cat([h, pet_skips[i], mri_skips[i]], dim=1), emb)
            else:
                h = block(h, emb)
        return self.out(h)


class M2Diff(nn.Module):
    """Dual-pathway conditional eps predictor (see module docstring).

    forward(x_t, t, ld, t1=None) -> eps_pet (B, 1, H, W)  (sampling; skips the MRI decoder)
    forward_heads(x_t, t, ld, t1=None, mri_keep=None) -> (eps_pet, eps_mri)
    x_t, ld, t1: (B, 1, H, W) with H, W multiples of ``stride``; t: (B,) integer timesteps.
    """

    is_diffusion = True

    def __init__(self, channels: Sequence[int], attention_levels: Sequence[bool],
                 num_res_blocks: int, num_heads: int, norm_num_groups: int, dropout: float,
                 mri_dropout: float, noise_cond: bool = False) -> None:
        super().__init__()
        channels = list(channels)
        self.stride = 2 ** (len(channels) - 1)
        self.mri_dropout = float(mri_dropout)
        self.temb_in = channels[0]
        temb = 4 * channels[0]
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        # Starts as a no-op (zero last layer): the timestep embedding alone, as without it.
        self.noise_embed = (nn.Sequential(nn.Linear(1, temb), nn.SiLU(), zero_module(nn.Linear(temb, temb)))
                            if noise_cond else None)
        no_attn = [False] * len(channels)
        common = dict(num_res_blocks=num_res_blocks, temb_ch=temb, groups=norm_num_groups,
                      dropout=dropout, heads=num_heads)
        self.pet_encoder = Encoder(2, channels, attention_levels, **common)
        self.mri_encoder = Encoder(2, channels, no_attn, **common)
        skips = self.pet_encoder.skip_channels
        self.pet_decoder = FusionDecoder(channels, attention_levels, skip_channels=skips, **common)
        self.mri_decoder = FusionDecoder(channels, no_attn, skip_channels=skips, **common)

    def _embed(self, t: Tensor, ld: Tensor) -> Tensor:
        batch, dtype = ld.shape[0], ld.dtype
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        emb = self.time_embed(get_timestep_embedding(t, self.temb_in).to(dtype))
        if self.noise_embed is not None:
            emb = emb + self.noise_embed(ld_noise_level(ld)[:, None])
        return emb

    def _encode(self, x_t: Tensor, ld: Tensor, t1: Tensor | None, mri_keep: Tensor | None,
                emb: Tensor) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
        h_pet, s_pet = self.pet_encoder(torch.cat([x_t, ld], dim=1), emb)
        if t1 is None and not self.training:
            return h_pet, s_pet, h_pet, s_pet  # MRI-free inference: the MRI encoder is not run
        batch = x_t.shape[0]
        if t1 is None:
            t1 = torch.zeros_like(ld)
            mri_keep = ~keep_all(batch, x_t.device)
        elif mri_keep is None:
            mri_keep = draw_keep(self.mri_dropout, batch, x_t.device) \
                if self.training and self.mri_dropout > 0 else keep_all(batch, x_t.device)
        t1 = masked_t1(t1, mri_keep)
        keep = mri_keep.to(device=x_t.device, dtype=torch.bool).view(-1, 1, 1, 1)
        h_mri, s_mri = self.mri_encoder(torch.cat([x_t, t1], dim=1), emb)
        h_mri = torch.where(keep, h_mri, h_pet)
        s_mri = [torch.where(keep, m, p) for m, p in zip(s_mri, s_pet, strict=True)]
        return h_pet, s_pet, h_mri, s_mri

    def forward_heads(self, x_t: Tensor, t: Tensor, ld: Tensor, t1: Tensor | None = None,
                      mri_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both heads. ``mri_keep`` (B,) bool: which samples see their MRI; default: all when
        ``t1`` is given (in eval mode) or a per-sample draw with p = ``mri_dropout`` (training);
        ``t1=None`` means MRI-free for every sample."""
        emb = self._embed(t, ld)
        h_pet, s_pet, h_mri, s_mri = self._encode(x_t, ld, t1, mri_keep, emb)
        eps_pet = self.pet_decoder(h_pet, s_pet, s_mri, emb)
        eps_mri = self.mri_decoder(h_mri, s_pet, s_mri, emb)
        return eps_pet, eps_mri

    def forward(self, x_t: Tensor, t: Tensor, ld: Tensor, t1: Tensor | None = None) -> Tensor:
        """PET head only (what sampling uses). Training goes through ``forward_heads``."""
        emb = self._embed(t, ld)
        h_pet, s_pet, _, s_mri = self._encode(x_t, ld, t1, None, emb)
        return self.pet_decoder(h_pet, s_pet, s_mri, emb)
