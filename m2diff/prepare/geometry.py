"""Voxel grids and rigid transforms between nibabel (RAS+) and SimpleITK / DICOM (LPS+).

nibabel affines map voxel indices to RAS+ mm (x to the right, y anterior, z superior);
DICOM and SimpleITK use LPS+ (x to the left, y posterior). The same physical point has
its x and y negated in the other convention, so a voxel->mm affine converts with
``FLIP @ affine`` and a point->point transform with ``FLIP @ M @ FLIP``. numpy volumes here
are (X, Y, Z) in voxel index order; SimpleITK arrays are (Z, Y, X).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
ORTHO_TOL = 1e-4


class GridError(ValueError):
    """A voxel grid that cannot be used (sheared, singular, not finite)."""


def check_affine(affine: np.ndarray) -> None:
    """Raise GridError unless ``affine`` (4, 4) has finite, non-zero, orthogonal voxel axes."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise GridError("voxel-to-mm affine is not finite")
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing < 1e-6):
        raise GridError("voxel-to-mm affine has a zero-length axis")
    d = m / spacing
    if np.max(np.abs(d.T @ d - np.eye(3))) > ORTHO_TOL:
        raise GridError("voxel axes are not orthogonal (sheared grid, e.g. CT-style gantry tilt)")


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """(X, Y, Z) array + RAS affine -> float32 SimpleITK image with the same physical grid."""
    check_affine(affine)
    lps = FLIP @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> ((X, Y, Z) float32 array, (4, 4) RAS affine)."""
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(data), FLIP @ lps


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder / flip voxel axes (no interpolation) to the orientation closest to RAS+, so
    axial slices lie along Z the way the model reads them. Returns (data, affine)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def matrix_from_sitk(transform: sitk.Euler3DTransform) -> np.ndarray:
    """(4, 4) RAS matrix of a SimpleITK rigid transform (fixed point -> moving point)."""
    m = np.eye(4)
    m[:3, :3] = np.reshape(transform.GetMatrix(), (3, 3))
    center = np.asarray(transform.GetCenter())
    m[:3, 3] = np.asarray(transform.GetTranslation()) + center - m[:3, :3] @ center
    return FLIP @ m @ FLIP


def rigid_to_sitk(matrix_ras: np.ndarray) -> sitk.Euler3DTransform:
    """(4, 4) RAS rigid matrix -> SimpleITK Euler3DTransform (LPS), the same mapping."""
    m = FLIP @ np.asarray(matrix_ras, dtype=np.float64) @ FLIP
    tx = sitk.Euler3DTransform()
    tx.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    tx.SetTranslation([float(v) for v in m[:3, 3]])
    return tx


def rotation_deg(matrix: np.ndarray) -> float:
    """Total rotation angle (degrees) of the (4, 4) or (3, 3) rigid ``matrix``."""
    r = np.asarray(matrix)[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def rigid_error(estimate: np.ndarray, truth: np.ndarray, points_mm: np.ndarray) -> tuple[float, float]:
    """How far ``estimate`` is from ``truth`` (both (4, 4), same convention): the mean
    displacement (mm) of ``points_mm`` (N, 3) and the rotation angle (degrees) between them."""
    diff = np.linalg.inv(truth) @ estimate
    pts = np.c_[points_mm, np.ones(len(points_mm))]
    moved = pts @ diff.T
    return float(np.mean(np.linalg.norm(moved[:, :3] - points_mm, axis=1))), rotation_deg(diff)
