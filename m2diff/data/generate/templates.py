"""The MNI ICBM152 maps that every simulated subject is a deformation of.

nilearn ships the T1 (skull-stripped), grey-matter, white-matter and brain-mask maps inside
the package, so nothing is downloaded. Importing nilearn.datasets and resampling the maps
to 2 mm takes seconds, so the 2 mm arrays are also kept in an .npz under the user cache
(``$XDG_CACHE_HOME/m2diff`` or ``~/.cache/m2diff``; ``M2DIFF_CACHE_DIR`` overrides), keyed
by nilearn's version, and in memory once per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Templates:
    """MNI152 maps on the 2 mm template grid, each (99, 117, 95) float32.

    ``t1`` is in [0, 1] (arbitrary units), ``gm``/``wm``/``mask`` are probabilities in [0, 1];
    ``affine`` (4, 4) maps template voxels to MNI mm. ``t1_gm``, ``t1_wm``, ``t1_csf`` are the
    template's typical T1 intensities of pure grey matter, white matter and CSF.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    t1_gm: float
    t1_wm: float
    t1_csf: float

    @property
    def csf(self) -> np.ndarray:
        """CSF probability: whatever of the brain mask is neither GM nor WM, (99, 117, 95)."""
        return np.clip(self.mask - self.gm - self.wm, 0.0, 1.0)


def _cache_file() -> Path:
    root = os.environ.get("M2DIFF_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m2diff"
    return Path(root) / f"mni152-2mm-nilearn-{version('nilearn')}.npz"


def _from_nilearn() -> Templates:
    from nilearn import datasets  # slow import (~2 s)

    def get(loader) -> tuple[np.ndarray, np.ndarray]:
        img = loader(resolution=2)
        return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=np.float64)

    t1, affine = get(datasets.load_mni152_template)
    gm, _ = get(datasets.load_mni152_gm_template)
    wm, _ = get(datasets.load_mni152_wm_template)
    mask, _ = get(datasets.load_mni152_brain_mask)
    t1, gm, wm, mask = (np.clip(a, 0.0, 1.0) for a in (t1, gm, wm, mask))
    gm, wm = gm * mask, wm * mask
    csf = (mask > 0.5) & (gm + wm < 0.2)
    return Templates(
        t1=t1, gm=gm, wm=wm, mask=mask, affine=affine,
        t1_gm=float(t1[gm > 0.8].mean()), t1_wm=float(t1[wm > 0.8].mean()),
        t1_csf=float(t1[csf].mean()),
    )


def _read_cache(path: Path) -> Templates | None:
    try:
        with np.load(path) as npz:
            return Templates(**{f.name: (npz[f.name] if npz[f.name].ndim else float(npz[f.name]))
                                for f in fields(Templates)})
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(path: Path, templates: Templates) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{f.name: getattr(templates, f.name) for f in fields(Templates)})
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs the slow path next time


@lru_cache(maxsize=1)
def load_templates() -> Templates:
    """nilearn's MNI152 maps at 2 mm: from memory, the disk cache or nilearn (in that order)."""
    path = _cache_file()
    templates = _read_cache(path) if path.is_file() else None
    if templates is None:
        templates = _from_nilearn()
        _write_cache(path, templates)
    return templates
