"""Acquire and reconstruct standard- and low-dose PET from an activity volume.

Per axial slice (2D acquisition): the activity (kBq/mL, already PSF-blurred) is
forward-projected with the radon system matrix, scaled so the subject's mean expected true
counts per slice equal ``counts`` at full dose, and Poisson counts are drawn. The low-dose
counts are a binomial thinning of the full-dose counts with p = dose, i.e. Poisson at
``dose`` times the mean, as when low-dose data are made by subsampling list-mode data. Both
are reconstructed with the same MLEM and divided by their count scale, so SD and LD are in
the same kBq/mL units. The full-count reconstruction is the SD target; no noise is ever
added to an image.

Simplified: no attenuation, scatter, randoms or detector normalisation; no axial
cross-talk (2D, each slice independent, beyond the 3D PSF applied to the activity); the
same pixel grid is used to simulate and reconstruct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from m2diff.data.generate.activity import FWHM_TO_SIGMA
from m2diff.data.generate.projector import Projector


@dataclass
class Scan:
    """``sd``, ``ld`` reconstructions (X, Y, Z) float32 kBq/mL; ``sd_counts`` and
    ``ld_counts`` the total prompts (true counts) of each acquisition."""

    sd: np.ndarray
    ld: np.ndarray
    sd_counts: int
    ld_counts: int


def mlem(proj: Projector, sinograms: np.ndarray, iterations: int,
         support: np.ndarray) -> np.ndarray:
    """MLEM of (N, n_angles, S) count sinograms -> (N, N, S) float32 images (count units).

    ``support`` (N, N) bool: pixels allowed to be non-zero (the scanner's field of view).
    """
    n = proj.size
    s = sinograms.shape[-1]
    y = sinograms.reshape(-1, s).astype(np.float32)
    inside = support.ravel()
    sens = np.where(inside, proj.sensitivity, 0.0).astype(np.float32)
    norm = np.divide(1.0, sens, out=np.zeros_like(sens), where=sens > 0)[:, None]
    x = np.zeros((n * n, s), dtype=np.float32)
    x[inside] = y.sum(axis=0) / max(float(sens.sum()), 1e-12)  # uniform start, same counts
    for _ in range(iterations):
        expected = proj.matrix @ x
        ratio = np.divide(y, expected, out=np.zeros_like(y), where=expected > 0)
        x *= (proj.adjoint @ ratio) * norm
    return x.reshape(n, n, s)


def acquire(activity: np.ndarray, proj: Projector, dose: float, counts: float,
            iterations: int, rng: np.random.Generator, post_filter_px: float = 0.0) -> Scan:
    """Standard-dose and ``dose``-fraction PET of an (N, N, Z) activity volume (kBq/mL).

    ``post_filter_px``: FWHM (pixels) of the in-plane Gaussian post-filter that clinical
    reconstructions apply after MLEM/OSEM (the same for SD and LD); 0 = none.
    """
    support = proj.support
    truth = np.where(support[:, :, None], activity, 0.0).astype(np.float32)
    mean_sino = proj.forward(truth)
    scale = counts * truth.shape[-1] / max(float(mean_sino.sum()), 1e-12)  # counts per unit line integral
    sd_counts = rng.poisson(np.clip(mean_sino * scale, 0.0, None))
    ld_counts = rng.binomial(sd_counts, dose)
    recon = mlem(proj, np.concatenate([sd_counts, ld_counts], axis=-1), iterations, support)
    if post_filter_px > 0:
        sigma = post_filter_px * FWHM_TO_SIGMA
        recon = ndimage.gaussian_filter(recon, (sigma, sigma, 0.0), mode="constant")
    z = truth.shape[-1]
    return Scan(sd=(recon[..., :z] / scale).astype(np.float32),
                ld=(recon[..., z:] / (scale * dose)).astype(np.float32),
                sd_counts=int(sd_counts.sum()), ld_counts=int(ld_counts.sum()))

