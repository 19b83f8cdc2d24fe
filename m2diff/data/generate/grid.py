"""The output voxel grid in MNI mm, and the finer grid the anatomy is built on.

Axial slices are square, centred in-plane on ``center_mm`` with a ``fov_mm`` field of view;
slice centres run evenly from ``z_mm[0]`` to ``z_mm[1]`` (so a coarse preset keeps the
cerebellum and the parietal cortex, just with thicker slices). Each output voxel is the mean
of ``factors`` fine voxels of at most ~``FINE_MM`` mm, which is how partial-volume effects
arise (block averaging of the continuous anatomy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FINE_MM = 3.0  # the templates are 2 mm: a finer grid adds cost more than detail


@dataclass(frozen=True)
class Grid:
    """``shape`` (X, Y, Z) voxels; ``affine`` (4, 4) voxel index -> MNI mm (RAS, axis-aligned);
    ``factors`` fine voxels per output voxel along X, Y, Z."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    factors: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        """Output voxel size (3,) in mm."""
        return np.diag(self.affine)[:3].copy()

    @property
    def fine_shape(self) -> tuple[int, int, int]:
        return tuple(n * f for n, f in zip(self.shape, self.factors, strict=True))

    @property
    def fine_spacing(self) -> np.ndarray:
        """Fine voxel size (3,) in mm."""
        return self.spacing / np.asarray(self.factors)

    def axes_mm(self, fine: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MNI mm of the (output or fine) voxel centres along X, Y and Z: three 1D arrays."""
        axes = []
        for a in range(3):
            f, n = (self.factors[a] if fine else 1), self.shape[a]
            index = (np.arange(n * f) + 0.5) / f - 0.5  # in output-voxel units
            axes.append(self.affine[a, 3] + self.affine[a, a] * index)
        return tuple(axes)

    def fine_axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MNI mm of the fine voxel centres along X, Y and Z."""
        return self.axes_mm(fine=True)

    def downsample(self, fine: np.ndarray) -> np.ndarray:
        """Block mean of a fine-grid array (fine_shape) to the output grid: (X, Y, Z) float32."""
        (nx, ny, nz), (fx, fy, fz) = self.shape, self.factors
        blocks = fine.reshape(nx, fx, ny, fy, nz, fz)
        return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def make_grid(shape: tuple[int, int, int], fov_mm: float, center_mm: tuple[float, float],
              z_mm: tuple[float, float]) -> Grid:
    """Grid of ``shape`` (N, N, Z): N x N axial slices of ``fov_mm`` mm, Z slices over ``z_mm``."""
    nx, ny, nz = shape
    dxy = fov_mm / nx
    dz = (z_mm[1] - z_mm[0]) / (nz - 1) if nz > 1 else max(z_mm[1] - z_mm[0], dxy)
    z0 = z_mm[0] if nz > 1 else 0.5 * (z_mm[0] + z_mm[1])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([dxy, dxy, dz])
    affine[:3, 3] = [center_mm[0] - fov_mm / 2 + dxy / 2,
                     center_mm[1] - dxy * ny / 2 + dxy / 2, z0]
    factors = tuple(max(1, math.ceil(s / FINE_MM - 1e-6)) for s in (dxy, dxy, dz))
    return Grid(shape=tuple(shape), affine=affine, factors=factors)
