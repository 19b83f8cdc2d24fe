"""Read and write NIfTI volumes with nibabel, keeping affine and header."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class Volume:
    """A 3D volume: ``data`` (X, Y, Z) float32 in the file's units, ``affine`` (4, 4) voxel->mm."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def as_3d(data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the third ((X, Y, Z, 1) -> (X, Y, Z)).

    Raises ValueError when the result is not 3D (a 2D image, a 4D series).
    """
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}")
    return data


def load_volume(path: Path) -> Volume:
    """Load a NIfTI file as float32 (X, Y, Z); raises on unreadable or non-3D files."""
    img = nib.load(str(path))
    data = as_3d(np.asarray(img.get_fdata(dtype=np.float32)))
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy())


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None) -> Path:
    """Write (X, Y, Z) float32 data as NIfTI (gzip by suffix), atomically (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine, hdr)
    img.header.set_data_dtype(np.float32)
    if hdr is not None:
        # Scaling from the input header would re-quantise our float output.
        img.header.set_slope_inter(1.0, 0.0)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path
