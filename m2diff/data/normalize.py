"""Invertible intensity normalisation and symmetric padding of axial slices.

Model space: ``y = 2 * x / scale - 1``; inverse ``x = (y + 1) * scale / 2`` (docs/CONTRACTS.md).
Background 0 maps to -1, which is also the padding value.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

from m2diff.config import ConfigError

BACKGROUND = -1.0  # model-space value of a zero-intensity voxel

ArrayT = TypeVar("ArrayT")  # np.ndarray or torch.Tensor: the maps are plain arithmetic


def pet_scale(ld: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of the positive finite voxels of a volume, in its units (> 0).

    Only positive voxels count so that zero padding of the field of view does not change
    the scale. Falls back to the largest absolute value, then 1.0, for degenerate input.
    Also used for T1 with its own volume.
    """
    values = np.asarray(ld, dtype=np.float64)
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    scale = float(np.percentile(positive, percentile)) if positive.size else 0.0
    if not (math.isfinite(scale) and scale > 0):
        scale = float(np.max(np.abs(values))) if values.size else 0.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def to_model(x: ArrayT, scale: float) -> ArrayT:
    """Input units -> model space: ``2 * x / scale - 1`` (same type and shape)."""
    return x * (2.0 / scale) - 1.0


def from_model(y: ArrayT, scale: float) -> ArrayT:
    """Model space -> input units: ``(y + 1) * scale / 2`` (same type and shape)."""
    return (y + 1.0) * (scale / 2.0)


def padded_size(h: int, w: int, stride: int, image_size: int | None = None) -> tuple[int, int]:
    """(H, W) for slices of (h, w) pixels: ``image_size`` squared if set, else the smallest
    multiples of ``stride``. Raises ConfigError for a stride or image_size that cannot work."""
    if int(stride) < 1:
        raise ConfigError(f"model stride must be a positive integer, got {stride}")
    if image_size:
        size = int(image_size)
        if size % stride:
            raise ConfigError(f"data.image_size={size} is not a multiple of the model's "
                              f"stride {stride}")
        return size, size
    return _round_up(h, stride), _round_up(w, stride)


def pad_offsets(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """Offsets (top, left) of an (h, w) image centred in ``size``; negative means cropped."""
    return (size[0] - h) // 2, (size[1] - w) // 2


def pad_or_crop(x: np.ndarray, size: tuple[int, int], value: float = BACKGROUND) -> np.ndarray:
    """Centre (..., h, w) in (..., H, W): pad with ``value`` where larger, crop where smaller."""
    h, w = x.shape[-2:]
    top, left = pad_offsets(h, w, size)
    out = np.full(x.shape[:-2] + tuple(size), value, dtype=x.dtype)
    src_y, dst_y = _overlap(top, h, size[0])
    src_x, dst_x = _overlap(left, w, size[1])
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def crop_back(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``pad_or_crop`` for padded axes: the centred (..., h, w) of (..., H, W)."""
    h, w = shape
    top, left = pad_offsets(h, w, x.shape[-2:])
    if top < 0 or left < 0:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} back to larger {shape}")
    return x[..., top:top + h, left:left + w]


def _overlap(offset: int, n: int, size: int) -> tuple[slice, slice]:
    """Source and destination slices of an n-long axis placed at ``offset`` in ``size``."""
    if offset >= 0:
        return slice(0, n), slice(offset, offset + n)
    return slice(-offset, -offset + size), slice(0, size)


def _round_up(n: int, stride: int) -> int:
    return max(stride, -(-int(n) // int(stride)) * int(stride))
