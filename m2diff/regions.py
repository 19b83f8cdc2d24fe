"""Brain regions in MNI space (mm), shared by the simulator (AD hypometabolism) and the
evaluation (regional SUVR bias).

Coordinates are the usual FDG-PET AD targets: bilateral angular gyrus / inferior parietal
lobule, posterior cingulate, precuneus and lateral temporal cortex; the reference region is
the cerebellar grey matter, with the pons as an alternative. Spheres are deliberately
generous so a coarse grid (tiny preset, ~6 mm voxels) still hits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    name: str
    centers_mm: tuple[tuple[float, float, float], ...]  # MNI (x, y, z); bilateral = two centers
    radius_mm: float


AD_REGIONS: tuple[Region, ...] = (
    Region("parietal", ((-44.0, -62.0, 36.0), (44.0, -62.0, 36.0)), 16.0),
    Region("posterior_cingulate", ((0.0, -44.0, 28.0),), 12.0),
    Region("precuneus", ((0.0, -64.0, 40.0),), 14.0),
    Region("temporal", ((-56.0, -30.0, -10.0), (56.0, -30.0, -10.0)), 14.0),
)
REFERENCE_REGION = Region("cerebellum", ((-24.0, -64.0, -32.0), (24.0, -64.0, -32.0)), 14.0)
PONS = Region("pons", ((0.0, -26.0, -34.0),), 8.0)


def voxel_mm(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel centre: (X, Y, Z, 3) float64."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def region_mask(shape: tuple[int, int, int], affine: np.ndarray, region: Region) -> np.ndarray:
    """Boolean (X, Y, Z) mask of the voxels within ``region`` (union of its spheres)."""
    xyz = voxel_mm(shape, affine)
    mask = np.zeros(shape, dtype=bool)
    for center in region.centers_mm:
        mask |= np.linalg.norm(xyz - np.asarray(center), axis=-1) <= region.radius_mm
    return mask


def ad_mask(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Union of all AD regions: boolean (X, Y, Z)."""
    mask = np.zeros(shape, dtype=bool)
    for region in AD_REGIONS:
        mask |= region_mask(shape, affine, region)
    return mask
