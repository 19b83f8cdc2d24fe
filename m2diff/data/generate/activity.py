"""FDG activity concentration of one subject (kBq/mL) and the scanner's point-spread blur.

Tissue uptake is about 4 : 1 grey to white matter with little in CSF; AD subjects lose a
fraction of grey-matter metabolism in each AD region (smooth region weights, applied to the
grey-matter term only, so it is intersected with GM). A low-frequency multiplicative field
gives every subject its own mild regional variation. Simplified: no skull/scalp, no blood
pool, no time dependence (a static late-uptake frame).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from m2diff.data.generate.anatomy import Anatomy

WM_RELATIVE = 0.25   # white / grey matter uptake
CSF_RELATIVE = 0.03  # CSF / grey matter uptake
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def fdg_activity(anatomy: Anatomy, gm_kbq_ml: float, hypometabolism: dict[str, float],
                 field: np.ndarray) -> np.ndarray:
    """Activity concentration (kBq/mL) on the fine grid, before any blur.

    ``gm_kbq_ml`` grey-matter uptake; ``hypometabolism`` region name -> fractional loss of
    grey-matter uptake (0.15-0.30 in AD); ``field`` multiplicative regional variation.
    """
    gm_uptake = np.ones_like(anatomy.gm)
    for name, loss in hypometabolism.items():
        gm_uptake -= loss * anatomy.regions[name]
    relative = anatomy.gm * np.clip(gm_uptake, 0.0, 1.0) + WM_RELATIVE * anatomy.wm \
        + CSF_RELATIVE * anatomy.csf
    return (gm_kbq_ml * relative * field).astype(np.float32)


def psf_blur(volume: np.ndarray, fwhm_mm: float, spacing_mm: np.ndarray) -> np.ndarray:
    """Isotropic Gaussian point-spread function of FWHM ``fwhm_mm`` (3D, zero outside)."""
    if fwhm_mm <= 0:
        return volume
    sigma = fwhm_mm * FWHM_TO_SIGMA / np.asarray(spacing_mm)
    return ndimage.gaussian_filter(volume, sigma, mode="constant", cval=0.0).astype(np.float32)
