"""One subject as a hospital scans it: PET on its own grid, a 1 mm T1 in another pose.

The PET volumes come from the ordinary simulator (subject.simulate_subject) on the PET grid,
whose mm coordinates are the PET scanner's frame. The head then moves between the scans:
the T1 scanner sees every point p of the PET frame at ``T(p) = R (p - c) + c + s`` (a
random rotation R of up to ``max_rotation_deg`` about the brain centre c and a shift s of
up to ``max_shift_mm``). The T1 is drawn on its own axis-aligned sagittal grid in the T1
frame: each T1 voxel is mapped back through T^-1 into the PET frame and the *same* brain
(same deformation, same atrophy) is looked up there, so ``T`` is the exact registration a
correct ``m2diff prepare`` must find. The T1 gets its own bias field, gain and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from m2diff.data.generate.anatomy import BRAIN_CENTER_MM, anatomy_at, template_positions
from m2diff.data.generate.grid import Grid
from m2diff.data.generate.mri import t1_weighted
from m2diff.data.generate.settings import Settings, SiteProfile
from m2diff.data.generate.subject import SubjectVolumes, settings_grid, simulate_subject
from m2diff.data.generate.templates import Templates


@dataclass(frozen=True)
class T1Grid:
    """The T1's voxel grid: ``shape`` (rows A->P, columns S->I, slices L->R), isotropic
    ``spacing_mm``, the way a sagittal 3D MPRAGE is stored."""

    shape: tuple[int, int, int]
    spacing_mm: float


@dataclass
class RawSubject:
    """``pet``: the simulated PET volumes (ld, sd, affine: PET frame, RAS); ``t1`` (X, Y, Z)
    float32 on ``t1_affine`` (T1 frame, RAS); ``pet_to_t1`` (4, 4) RAS: T above."""

    pet: SubjectVolumes
    t1: np.ndarray
    t1_affine: np.ndarray
    pet_to_t1: np.ndarray


def draw_rigid(rng: np.random.Generator, max_rotation_deg: float, max_shift_mm: float,
               center_mm: np.ndarray = BRAIN_CENTER_MM) -> np.ndarray:
    """(4, 4) rigid map p -> R (p - c) + c + s: rotation about a random axis by 30-100 % of
    ``max_rotation_deg``, shift of 30-100 % of ``max_shift_mm`` in a random direction."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(max_rotation_deg * rng.uniform(0.3, 1.0))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * max_shift_mm * rng.uniform(0.3, 1.0)
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(axis * angle).as_matrix()
    m[:3, 3] = center_mm - m[:3, :3] @ center_mm + shift
    return m


def t1_affine(grid: T1Grid, center_mm: np.ndarray) -> np.ndarray:
    """RAS affine of a sagittal grid centred on ``center_mm``: voxel axes run posterior,
    inferior and right (DICOM rows along +y LPS, columns along -z, slices along -x LPS)."""
    a = np.zeros((4, 4))
    a[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float) * grid.spacing_mm
    a[3, 3] = 1.0
    middle = (np.asarray(grid.shape) - 1) / 2.0
    a[:3, 3] = center_mm - a[:3, :3] @ middle
    return a


def _positions_at(points_mm: np.ndarray, grid: Grid, warp) -> np.ndarray:
    """Template positions (3, *points.shape[1:]) of PET-frame points, with the deformation
    of ``grid``'s subject: its affine part exactly, its smooth displacement interpolated
    from the PET fine grid (held constant beyond its edge)."""
    pos = template_positions(grid, warp)
    linear = template_positions(grid, replace(warp, displacement_mm=0.0))
    displacement = pos - linear
    axes = grid.fine_axes_mm()
    index = np.stack([(points_mm[d] - axes[d][0]) / (axes[d][1] - axes[d][0]) for d in range(3)])
    m = linear.reshape(3, -1)
    # The linear part is affine in the fine-grid index: recover it from three neighbours.
    origin = m[:, 0].astype(np.float64)
    steps = np.stack([linear[(slice(None), *(1 if a == d else 0 for a in range(3)))] - origin
                      for d in range(3)], axis=1).astype(np.float64)
    out = origin.reshape(3, 1, 1, 1) + np.einsum("ij,j...->i...", steps, index)
    for d in range(3):
        out[d] += ndimage.map_coordinates(displacement[d], index, order=1, mode="nearest")
    return out.astype(np.float32)


def simulate_raw_subject(settings: Settings, profile: SiteProfile, diagnosis: str,
                         seed: np.random.SeedSequence, templates: Templates, grid_t1: T1Grid,
                         max_rotation_deg: float, max_shift_mm: float) -> RawSubject:
    """The PET of ``simulate_subject`` on ``settings``' grid plus the same brain's T1 on
    ``grid_t1`` in a random pose (streams of ``seed`` beyond the simulator's four)."""
    pet = simulate_subject(settings, profile, diagnosis, seed, templates)
    pose_rng, mri_rng = (np.random.default_rng(np.random.SeedSequence(
        seed.entropy, spawn_key=(*seed.spawn_key, 100 + k))) for k in range(2))
    pet_to_t1 = draw_rigid(pose_rng, max_rotation_deg, max_shift_mm)
    center_t1 = (pet_to_t1 @ np.r_[BRAIN_CENTER_MM, 1.0])[:3] + pose_rng.uniform(-5, 5, 3)
    affine = t1_affine(grid_t1, center_t1)
    ijk = np.indices(grid_t1.shape, dtype=np.float32).reshape(3, -1)
    to_pet = np.linalg.inv(pet_to_t1) @ affine
    points = (to_pet[:3, :3] @ ijk + to_pet[:3, 3:]).reshape(3, *grid_t1.shape)
    pos = _positions_at(points, settings_grid(settings), pet.warp)
    anatomy = anatomy_at(templates, pos, pet.atrophy, pet.global_atrophy)
    axes = tuple(np.arange(n) * grid_t1.spacing_mm for n in grid_t1.shape)
    t1 = t1_weighted(anatomy.t1, profile.t1_contrast, axes, mri_rng)
    return RawSubject(pet=pet, t1=t1, t1_affine=affine, pet_to_t1=pet_to_t1)
