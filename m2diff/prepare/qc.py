"""Registration QC pictures: T1 edges over the PET in three planes, and a contact sheet.

Each plane is resampled at display resolution (the T1's voxel size, at least 1 mm) through
the centre of the PET's brain, the PET from its own grid and the T1 through the found
transform, so the T1's edges are drawn at their own detail; a person sees in a second
whether the cortex outline sits on the PET's grey matter. Axial: right of the patient on
the right of the picture, anterior up; coronal: superior up; sagittal: anterior right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.feature import canny

from m2diff.report import plt, save_figure

PLANES = (("axial", 2, "R", "A"), ("coronal", 1, "R", "S"), ("sagittal", 0, "A", "S"))


def _plane(pet: sitk.Image, axis: int, center_index: np.ndarray, spacing: float) -> sitk.Image:
    """A one-voxel-thick reference grid through ``center_index`` (PET voxel coordinates)
    normal to PET axis ``axis``, covering the PET's extent at ``spacing`` mm."""
    size = np.asarray(pet.GetSize())
    extent = size * np.asarray(pet.GetSpacing())
    new_size = np.maximum(1, np.round(extent / spacing)).astype(int)
    new_spacing = np.full(3, spacing)
    new_size[axis], new_spacing[axis] = 1, pet.GetSpacing()[axis]
    start = -0.5 + new_spacing / np.asarray(pet.GetSpacing()) / 2.0  # first voxel's centre
    start_index = np.where(np.arange(3) == axis, center_index, start)
    ref = sitk.Image([int(n) for n in new_size], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in new_spacing])
    ref.SetDirection(pet.GetDirection())
    ref.SetOrigin(pet.TransformContinuousIndexToPhysicalPoint([float(v) for v in start_index]))
    return ref


def _planes(pet: sitk.Image, t1: sitk.Image, transform: sitk.Transform, brain: np.ndarray
            ) -> list[tuple[str, np.ndarray, np.ndarray, str, str]]:
    spacing = max(1.0, min(t1.GetSpacing()))
    center = np.argwhere(brain).mean(axis=0) if brain.any() else (np.asarray(pet.GetSize()) - 1) / 2
    out = []
    for name, axis, right, up in PLANES:
        ref = _plane(pet, axis, center, spacing)
        p = sitk.GetArrayFromImage(sitk.Resample(pet, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
        m = sitk.GetArrayFromImage(sitk.Resample(t1, ref, transform, sitk.sitkLinear, 0.0))
        # (Z, Y, X) arrays with one voxel along ``axis``: keep the 2D plane as (horizontal, vertical)
        p2, m2 = (np.squeeze(a.transpose(2, 1, 0), axis=axis) for a in (p, m))
        out.append((name, p2, m2, right, up))
    return out


def subject_figure(pet: sitk.Image, t1: sitk.Image, transform: sitk.Transform,
                   brain: np.ndarray, title: str, failed: bool, png: Path) -> Path:
    """Write the three-plane QC picture of one subject to ``png``."""
    planes = _planes(pet, t1, transform, brain)
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.4))
    for ax, (name, p, m, right, up) in zip(axes, planes, strict=True):
        hi = float(np.percentile(p, 99.5)) or 1.0
        ax.imshow(p.T, origin="lower", cmap="gray", vmin=0.0, vmax=hi, interpolation="bilinear")
        if np.ptp(m) > 0:
            edges = canny(m / max(float(np.percentile(m, 99.5)), 1e-6), sigma=1.5,
                          low_threshold=0.08, high_threshold=0.2)
            overlay = np.zeros((*edges.T.shape, 4))
            overlay[edges.T] = (1.0, 0.25, 0.1, 0.9) if failed else (0.1, 0.9, 1.0, 0.9)
            ax.imshow(overlay, origin="lower", interpolation="nearest")
        ax.set_title(f"{name} ({right} right, {up} up)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9, color="red" if failed else "black")
    fig.tight_layout()
    return save_figure(fig, png, dpi=90)


def contact_sheet(pngs: Sequence[Path], png: Path, title: str, columns: int = 2) -> Path:
    """Tile the subjects' QC pictures (``pngs``, in order) into one PNG."""
    images = [plt.imread(str(p)) for p in pngs]
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image in zip(axes.ravel(), images, strict=False):
        ax.imshow(image)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, png, dpi=110)
