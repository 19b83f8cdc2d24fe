"""Smooth random fields on tensor-product grids (cubic B-splines on a coarse lattice).

Used for the deformation, the regional uptake variation and the MRI bias field. Because
the grid is a tensor product of three axes, evaluating the spline is three small matrix
products, far cheaper than filtering a full-resolution noise volume.
"""

from __future__ import annotations

import numpy as np


def bspline_matrix(positions: np.ndarray, n_control: int) -> np.ndarray:
    """(len(positions), n_control) cubic B-spline weights; positions in control units,
    control point k sitting at position k - 1 (one spare control point each side)."""
    d = np.abs(positions[:, None] - np.arange(n_control)[None, :] + 1.0)
    return np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))


def random_field(axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray], control_mm: float,
                 std: float, rng: np.random.Generator, components: int = 1) -> np.ndarray:
    """(components, X, Y, Z) float32 smooth field over the grid ``axes_mm`` (three 1D arrays).

    Control-point values are N(0, ``std``); the spline smooths them, so the field's own
    std is about 0.5 * ``std`` and its correlation length about ``control_mm``.
    """
    mats, counts = [], []
    for ax in axes_mm:
        t = (ax - ax[0]) / control_mm
        n = int(np.ceil(t[-1])) + 3
        mats.append(bspline_matrix(t, n))
        counts.append(n)
    coeffs = rng.normal(0.0, std, (components, *counts))
    field = np.einsum("ai,bj,ck,dijk->dabc", *mats, coeffs, optimize=True)
    return field.astype(np.float32)
