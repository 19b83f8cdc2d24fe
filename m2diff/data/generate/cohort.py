"""Simulated multi-site cohorts written as site folders (m2diff.data.layout).

``generate_sites`` plans every site (name, profile, which subjects are AD) from the seed,
then simulates and writes the subjects in up to ``workers`` processes. Every subject has
its own SeedSequence, so the files do not depend on the number of workers or the order in
which subjects finish.
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from m2diff.config import ConfigError
from m2diff.data.generate.settings import Settings, SiteProfile, read_settings
from m2diff.data.generate.subject import settings_grid, simulate_subject
from m2diff.data.generate.templates import Templates, load_templates
from m2diff.data.layout import ld_path, sd_path, t1_path, write_participants
from m2diff.data.nifti import save_volume
from m2diff.regions import REFERENCE_REGION, ad_mask, region_mask

# Distinct leading words keep the site and subject seed streams apart.
_SITE_STREAM, _SUBJECT_STREAM = 1, 2


@dataclass(frozen=True)
class SitePlan:
    """One site to write: folder ``name``, its ``profile`` and one diagnosis per subject."""

    index: int
    name: str
    profile: SiteProfile
    diagnoses: tuple[str, ...]

    def subject_ids(self) -> list[str]:
        return [f"sub-{i + 1:03d}" for i in range(len(self.diagnoses))]


@dataclass(frozen=True)
class SubjectJob:
    """Everything a worker process needs to simulate and write one subject."""

    settings: Settings
    profile: SiteProfile
    site_dir: Path
    subject_id: str
    diagnosis: str
    entropy: tuple[int, ...]


def plan_sites(settings: Settings, seed: int) -> list[SitePlan]:
    """Site names (profiles cycled, made unique) and each site's CN/AD assignment.

    A site of n subjects (its profile's ``subjects``) has round(ad_fraction * n) AD subjects
    (halves round up), placed at random positions drawn from the site's seed stream.
    """
    plans, seen = [], {}
    for index in range(settings.sites):
        profile = settings.site_profiles[index % len(settings.site_profiles)]
        seen[profile.name] = seen.get(profile.name, 0) + 1
        name = profile.name if seen[profile.name] == 1 else f"{profile.name}-{seen[profile.name]}"
        n = profile.subjects
        n_ad = min(n, math.floor(profile.ad_fraction * n + 0.5))
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SITE_STREAM, index]))
        is_ad = np.zeros(n, dtype=bool)
        is_ad[rng.permutation(n)[:n_ad]] = True
        plans.append(SitePlan(index, name, profile, tuple("AD" if a else "CN" for a in is_ad)))
    return plans


def check_coverage(settings: Settings) -> None:
    """Raise ConfigError unless the slab holds the cerebellum reference and the AD regions."""
    grid = settings_grid(settings)
    for what, mask in (("the cerebellum reference region", region_mask(grid.shape, grid.affine, REFERENCE_REGION)),
                       ("the AD regions", ad_mask(grid.shape, grid.affine))):
        if not mask.any():
            raise ConfigError(f"generate.z_mm={list(settings.z_mm)} with shape={list(settings.shape)} "
                              f"misses {what} (see m2diff/regions.py)")


def _nifti_header(description: str) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header["descrip"] = description[:79].encode()
    return header


_TEMPLATES: Templates | None = None


def _init_worker(templates: Templates) -> None:
    global _TEMPLATES
    _TEMPLATES = templates


def write_subject(job: SubjectJob) -> str:
    """Simulate one subject and write its T1, LD and SD NIfTI files; returns the subject id."""
    vol = simulate_subject(job.settings, job.profile, job.diagnosis,
                           np.random.SeedSequence(list(job.entropy)), _TEMPLATES)
    dose = f"dose {job.profile.dose:g}"
    save_volume(t1_path(job.site_dir, job.subject_id), vol.t1, vol.affine,
                _nifti_header("m2diff simulated T1w (a.u.)"))
    save_volume(ld_path(job.site_dir, job.subject_id), vol.ld, vol.affine,
                _nifti_header(f"m2diff simulated FDG PET kBq/mL, low dose ({dose})"))
    save_volume(sd_path(job.site_dir, job.subject_id), vol.sd, vol.affine,
                _nifti_header("m2diff simulated FDG PET kBq/mL, standard dose"))
    return job.subject_id


def _check_writable(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(out))


def _run_jobs(jobs: list[SubjectJob], workers: int, templates: Templates,
              advance: Callable[[SubjectJob], None]) -> None:
    if workers <= 1:
        _init_worker(templates)
        for job in jobs:
            write_subject(job)
            advance(job)
        return
    # fork where it exists: workers start in milliseconds with the templates already in
    # memory, and a caller's script needs no `if __name__ == "__main__"` guard (spawn would
    # re-import it). Workers only run numpy/scipy and write files, so threads the parent
    # may hold (rich's refresh thread, torch's pool) are never touched in the child.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux" else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(templates,)) as pool:
        futures = {pool.submit(write_subject, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                future.result()
                advance(futures[future])
        except BaseException:
            for future in futures:  # fail fast: do not simulate the queued subjects first
                future.cancel()
            raise


def generate_sites(gen_cfg: Mapping[str, Any], out: Path, seed: int,
                   progress: bool = True) -> list[Path]:
    """Write ``gen_cfg.sites`` simulated site folders under ``out``; returns their paths.

    ``gen_cfg`` is ``cfg.generate`` (conf/generate/*.yaml). Raises ConfigError for bad
    settings and OSError when ``out`` cannot be written. Same seed -> same voxel data.
    """
    settings = read_settings(gen_cfg)
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    check_coverage(settings)
    out = Path(out)
    _check_writable(out)
    plans = plan_sites(settings, seed)
    jobs = [SubjectJob(settings, plan.profile, out / plan.name, sid, dx,
                       (seed, _SUBJECT_STREAM, plan.index, i))
            for plan in plans
            for i, (sid, dx) in enumerate(zip(plan.subject_ids(), plan.diagnoses, strict=True))]
    workers = max(1, min(settings.workers, os.cpu_count() or 1, len(jobs)))
    templates = load_templates()

    if progress:
        from m2diff.progress import progress_bar

        with progress_bar() as bar:
            task = bar.add_task("generate", total=len(jobs))
            _run_jobs(jobs, workers, templates,
                      lambda job: bar.update(task, advance=1,
                                             description=f"generate {job.site_dir.name}/{job.subject_id}"))
    else:
        _run_jobs(jobs, workers, templates, lambda job: None)

    for plan in plans:
        write_participants(out / plan.name, [
            {"participant_id": sid, "diagnosis": dx}
            for sid, dx in zip(plan.subject_ids(), plan.diagnoses, strict=True)])
    return [out / plan.name for plan in plans]
