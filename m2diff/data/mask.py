"""Brain mask of a PET (or T1) volume: threshold at a fraction of a high percentile."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def brain_mask(volume: np.ndarray, fraction: float = 0.15, percentile: float = 99.0,
               min_component: float = 0.01) -> np.ndarray:
    """Boolean mask (same shape as ``volume``, 2D or 3D) of the brain.

    Voxels above ``fraction`` x the ``percentile`` of the positive voxels, holes filled;
    connected components smaller than ``min_component`` x the largest are dropped (noise
    specks of a low-dose PET outside the head).
    """
    vol = np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    positive = vol[vol > 0]
    if positive.size == 0:
        return np.zeros(vol.shape, dtype=bool)
    mask = vol > fraction * float(np.percentile(positive, percentile))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_component * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return mask
