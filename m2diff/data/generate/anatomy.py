"""One subject's anatomy: the MNI152 template, smoothly deformed, with AD atrophy.

Everything is evaluated on the fine grid (grid.py) in one pass: each fine voxel looks up the
template at its deformed position (trilinear), so there is a single interpolation. The
deformation is a random small affine (scaling, rotation, shift about the brain centre)
plus a cubic B-spline free-form displacement with control points every ``CONTROL_MM``.
AD regions (m2diff.regions) are defined in template space, so they follow the subject's
anatomy; their edges are smooth (logistic fall-off over ``EDGE_MM``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from m2diff.data.generate.fields import random_field
from m2diff.data.generate.grid import Grid
from m2diff.data.generate.templates import Templates
from m2diff.regions import AD_REGIONS

CONTROL_MM = 24.0
EDGE_MM = 4.0
BRAIN_CENTER_MM = np.array([0.0, -18.0, 10.0])


@dataclass(frozen=True)
class Warp:
    """A subject's deformation parameters (mm, radians); see ``draw_warp``."""

    scale: tuple[float, float, float]
    rotation: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    displacement_mm: float  # std of the B-spline control-point displacements
    seed: int  # of the control-point displacements


@dataclass
class Anatomy:
    """Tissue maps on the grid's fine_shape, float32.

    ``t1`` template T1 intensity in [0, 1] after atrophy; ``gm``/``wm``/``csf`` tissue
    fractions in [0, 1]; ``regions`` maps each AD region's name to its smooth [0, 1] weight.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    regions: dict[str, np.ndarray]


def draw_warp(rng: np.random.Generator) -> Warp:
    """Random inter-subject variation of head size, pose and local shape."""
    return Warp(
        scale=tuple(rng.normal(1.0, 0.04, 3).clip(0.9, 1.1)),
        rotation=tuple(np.deg2rad(rng.normal(0.0, 2.0, 3).clip(-5, 5))),
        shift_mm=tuple(rng.normal(0.0, 1.5, 3).clip(-4, 4)),
        displacement_mm=float(rng.uniform(2.0, 4.0)),
        seed=int(rng.integers(2**31)),
    )


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def template_positions(grid: Grid, warp: Warp) -> np.ndarray:
    """MNI mm, in template space, of every fine voxel: (3, *fine_shape) float32."""
    axes = grid.fine_axes_mm()
    disp = random_field(axes, CONTROL_MM, warp.displacement_mm,
                        np.random.default_rng(warp.seed), components=3)
    m = _rotation(warp.rotation) * np.asarray(warp.scale)[None, :]
    rel = [ax - c for ax, c in zip(axes, BRAIN_CENTER_MM, strict=True)]
    pos = np.empty((3, *grid.fine_shape), dtype=np.float32)
    for d in range(3):
        pos[d] = (BRAIN_CENTER_MM[d] + warp.shift_mm[d]
                  + m[d, 0] * rel[0][:, None, None] + m[d, 1] * rel[1][None, :, None]
                  + m[d, 2] * rel[2][None, None, :] + disp[d])
    return pos


def _region_weight(pos: np.ndarray, centers: tuple[tuple[float, float, float], ...],
                   radius: float) -> np.ndarray:
    weight = np.zeros(pos.shape[1:], dtype=np.float32)
    for center in centers:
        dist = np.sqrt(sum((pos[d] - center[d]) ** 2 for d in range(3)))
        np.maximum(weight, 1.0 / (1.0 + np.exp((dist - radius) / EDGE_MM)), out=weight)
    return weight


def build_anatomy(templates: Templates, grid: Grid, warp: Warp, atrophy: dict[str, float],
                  global_atrophy: float) -> Anatomy:
    """Deform the templates onto the fine grid and apply cortical atrophy.

    ``atrophy`` maps AD region names to the fraction of grey matter lost there (0 for CN);
    ``global_atrophy`` is the fraction lost everywhere. Lost grey matter becomes CSF, and the
    T1 darkens accordingly (towards the template's CSF intensity).
    """
    return anatomy_at(templates, template_positions(grid, warp), atrophy, global_atrophy)


def anatomy_at(templates: Templates, pos: np.ndarray, atrophy: dict[str, float],
               global_atrophy: float) -> Anatomy:
    """``build_anatomy`` at given template-space positions ``pos`` (3, *shape), MNI mm: any
    set of points (the raw exporter samples a rotated T1 grid with it)."""
    shape = pos.shape[1:]
    inv = np.linalg.inv(templates.affine)
    vox = np.einsum("ij,j...->i...", inv[:3, :3], pos) + inv[:3, 3].reshape(3, 1, 1, 1)

    # Only points that land in the template's brain box can be non-zero: sample just those.
    box = [np.flatnonzero(templates.mask.any(axis=tuple(a for a in range(3) if a != d)))
           for d in range(3)]
    inside = np.ones(shape, dtype=bool)
    for d in range(3):
        inside &= (vox[d] > box[d][0] - 1) & (vox[d] < box[d][-1] + 1)
    points = vox[:, inside]

    def sample(volume: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, dtype=np.float32)
        out[inside] = ndimage.map_coordinates(volume, points, order=1, mode="constant",
                                              cval=0.0, prefilter=False)
        return out

    t1, gm, wm, mask = (sample(v) for v in (templates.t1, templates.gm, templates.wm, templates.mask))
    regions = {r.name: _region_weight(pos, r.centers_mm, r.radius_mm) for r in AD_REGIONS}
    loss = np.full(gm.shape, global_atrophy, dtype=np.float32)
    for name, fraction in atrophy.items():
        loss += fraction * regions[name]
    lost_gm = gm * np.clip(loss, 0.0, 0.9)
    gm = gm - lost_gm
    t1 = t1 - lost_gm * (templates.t1_gm - templates.t1_csf)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return Anatomy(t1=np.clip(t1, 0.0, None), gm=gm, wm=wm, csf=csf, regions=regions)
