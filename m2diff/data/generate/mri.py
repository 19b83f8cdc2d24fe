"""The T1-weighted MRI a site's scanner would give for a subject's anatomy.

Site contrast is a power law on the template intensity (``t1_contrast`` > 1 stretches the
grey/white difference); each scan also gets a smooth receive-bias field, a global gain
(arbitrary scanner units, ~1000 for white matter) and Gaussian thermal noise. MRI magnitude
noise really is image-domain noise (Rician ~ Gaussian at this SNR), unlike PET.
"""

from __future__ import annotations

import numpy as np

from m2diff.data.generate.fields import random_field


def t1_weighted(t1: np.ndarray, contrast: float,
                axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
                rng: np.random.Generator, noise: float = 0.015) -> np.ndarray:
    """(X, Y, Z) float32 T1 from the template intensity ``t1`` in [0, 1] on the output grid
    whose voxel centres lie at ``axes_mm`` (MNI mm along X, Y, Z)."""
    gain = rng.uniform(800.0, 1200.0)
    bias = np.exp(random_field(axes_mm, 80.0, 0.12, rng)[0])
    image = gain * bias * np.power(np.clip(t1, 0.0, None), contrast)
    image += rng.normal(0.0, noise * gain, t1.shape) * (t1 > 0.02)
    return np.clip(image, 0.0, None).astype(np.float32)
