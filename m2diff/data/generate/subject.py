"""Simulate one subject end to end: anatomy -> T1 and FDG activity -> SD / LD PET.

The subject's random draws come from four independent streams of one SeedSequence
(anatomy, uptake, MRI, scanner), so changing the site's dose leaves the anatomy, the
uptake, the T1 and the standard-dose counts unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from m2diff.data.generate.activity import fdg_activity, psf_blur
from m2diff.data.generate.anatomy import Warp, build_anatomy, draw_warp
from m2diff.data.generate.fields import random_field
from m2diff.data.generate.grid import Grid, make_grid
from m2diff.data.generate.mri import t1_weighted
from m2diff.data.generate.projector import projector
from m2diff.data.generate.scanner import acquire
from m2diff.data.generate.settings import Settings, SiteProfile
from m2diff.data.generate.templates import Templates, load_templates
from m2diff.regions import AD_REGIONS


@dataclass
class SubjectVolumes:
    """One subject on the output grid: ``t1`` (arbitrary units), ``ld``/``sd`` PET and the
    noise-free, PSF-blurred ``activity`` (kBq/mL), all (X, Y, Z) float32 sharing ``affine``."""

    t1: np.ndarray
    ld: np.ndarray
    sd: np.ndarray
    activity: np.ndarray
    affine: np.ndarray
    hypometabolism: dict[str, float]
    # What the anatomy was built from, so the raw exporter can draw the same brain elsewhere.
    warp: Warp | None = None
    atrophy: dict[str, float] = field(default_factory=dict)
    global_atrophy: float = 0.0


def settings_grid(settings: Settings) -> Grid:
    return make_grid(settings.shape, settings.fov_mm, settings.center_mm, settings.z_mm)


def _streams(seed: np.random.SeedSequence | int, n: int) -> list[np.random.Generator]:
    # Like seed.spawn(n), but without advancing the caller's SeedSequence: the same seed
    # object always gives the same subject.
    seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [np.random.default_rng(np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, k)))
            for k in range(n)]


def simulate_subject(settings: Settings, profile: SiteProfile, diagnosis: str,
                     seed: np.random.SeedSequence | int,
                     templates: Templates | None = None) -> SubjectVolumes:
    """Simulate one CN or AD subject scanned at ``profile``'s site (same seed, same subject)."""
    templates = load_templates() if templates is None else templates
    grid = settings_grid(settings)
    anat_rng, uptake_rng, mri_rng, scan_rng = _streams(seed, 4)
    ad = diagnosis == "AD"

    warp = draw_warp(anat_rng)
    names = [r.name for r in AD_REGIONS]
    atrophy = {n: float(anat_rng.uniform(0.10, 0.25)) if ad else 0.0 for n in names}
    global_atrophy = float(anat_rng.uniform(0.02, 0.06)) if ad else float(anat_rng.uniform(0.0, 0.02))
    anatomy = build_anatomy(templates, grid, warp, atrophy, global_atrophy)

    hypo = {n: float(uptake_rng.uniform(0.15, 0.30)) if ad else 0.0 for n in names}
    gm_kbq_ml = float(uptake_rng.uniform(8.0, 12.0))
    field = np.exp(random_field(grid.fine_axes_mm(), 30.0, 0.08, uptake_rng)[0])
    activity = fdg_activity(anatomy, gm_kbq_ml, hypo, field)
    activity = grid.downsample(psf_blur(activity, profile.psf_mm, grid.fine_spacing))

    t1 = t1_weighted(grid.downsample(anatomy.t1), profile.t1_contrast, grid.axes_mm(), mri_rng)
    scan = acquire(activity, projector(settings.shape[0], settings.angles), profile.dose,
                   settings.counts, settings.mlem_iters, scan_rng,
                   post_filter_px=settings.post_filter_mm / float(grid.spacing[0]))
    return SubjectVolumes(t1=t1, ld=scan.ld, sd=scan.sd, activity=activity,
                          affine=grid.affine.copy(), hypometabolism=hypo, warp=warp,
                          atrophy=atrophy, global_atrophy=global_atrophy)
