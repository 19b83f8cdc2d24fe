"""``m2diff generate export=raw``: what a hospital hands over, not a prepared site.

Each site becomes an export folder (the layout ``m2diff prepare`` reads):
```
OUT/<site>/participants.csv          participant_id, diagnosis, age (a spreadsheet)
OUT/<site>/<id>/DICOM/<opaque names> every series of the subject in one folder (DICOM subjects)
OUT/<site>/<id>/nifti/*.nii.gz       T1, low- and standard-dose PET, JSON sidecars (the others)
OUT/truth/<site>.json                the known T1 pose per subject (for tests and benchmarks)
```
Subjects are simulated as by ``m2diff generate`` (same profiles, same seeds -> same brains)
but the PET lies on its own 2-3 mm grid and the T1 on a ~1 mm sagittal grid in another pose
(raw_subject.py). Every ``dicom_every``-th subject is written as DICOM series (T1, LD, SD
and a localizer, file names opaque), the others as NIfTI (T1 sagittal, PET flipped
left-right as FSL-style tools store it) with dcm2niix-style JSON sidecars.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from m2diff.config import ConfigError
from m2diff.data.generate.cohort import check_coverage, plan_sites
from m2diff.data.generate.dicom_export import (
    F18_HALF_LIFE_S,
    SeriesHeader,
    mr_tags,
    pet_tags,
    uid,
    write_series,
)
from m2diff.data.generate.raw_subject import RawSubject, T1Grid, simulate_raw_subject
from m2diff.data.generate.settings import Settings, SiteProfile, read_settings
from m2diff.data.generate.templates import load_templates
from m2diff.data.nifti import save_volume

_RAW_STREAM = 3  # beside cohort's site (1) and subject (2) streams
SD_FRAME_S = 600.0  # a 10-minute static brain frame


@dataclass(frozen=True)
class ExportSettings:
    """``cfg.export`` (conf/export/raw*.yaml), checked."""

    pet: Settings
    t1: T1Grid
    max_rotation_deg: float
    max_shift_mm: float
    dicom_every: int


def read_export_settings(gen_cfg: Mapping[str, Any], export_cfg: Mapping[str, Any]) -> ExportSettings:
    """The generator's settings with the export's PET grid; raise ConfigError naming the key."""
    base = read_settings(gen_cfg)

    def numbers(key: str, n: int, kind: type) -> tuple:
        value = export_cfg.get(key)
        try:
            items = tuple(kind(v) for v in value)
            if len(items) != n:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"export.{key} must be a list of {n} numbers, got {value!r}") from None
        return items

    def number(key: str, low: float, high: float) -> float:
        value = export_cfg.get(key)
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"export.{key} must be a number, got {value!r}") from None
        if not low <= x <= high:
            raise ConfigError(f"export.{key} must be in [{low}, {high}], got {value!r}")
        return x

    shape = numbers("pet_shape", 3, int)
    if shape[0] != shape[1] or shape[0] < 8 or shape[2] < 2:
        raise ConfigError(f"export.pet_shape must be [N, N, Z] with N >= 8, Z >= 2, got {list(shape)}")
    pet = replace(base, shape=shape, fov_mm=number("pet_fov_mm", 50.0, 400.0),
                  z_mm=numbers("pet_z_mm", 2, float))
    t1_shape = numbers("t1_shape", 3, int)
    if min(t1_shape) < 8:
        raise ConfigError(f"export.t1_shape must be >= 8 voxels per axis, got {list(t1_shape)}")
    return ExportSettings(
        pet=pet, t1=T1Grid(t1_shape, number("t1_spacing_mm", 0.5, 4.0)),
        max_rotation_deg=number("max_rotation_deg", 0.0, 45.0),
        max_shift_mm=number("max_shift_mm", 0.0, 50.0),
        dicom_every=int(number("dicom_every", 0, 1000)))


def _pet_meta(profile: SiteProfile, dose: float, injected_bq: float, weight: float) -> dict:
    pct = f"{dose * 100:g}"
    frame = SD_FRAME_S * dose
    desc = (f"PET Brain FDG low dose {pct}% (list-mode {frame:g} s)" if dose < 1
            else "PET Brain FDG standard dose")
    return {"description": desc, "frame_s": frame, "injected_bq": injected_bq, "weight": weight}


def _write_dicom_subject(folder: Path, sid: str, raw: RawSubject, profile: SiteProfile,
                         rng: np.random.Generator, entropy: str) -> None:
    study = uid(entropy, "study")
    injected, weight = float(rng.uniform(150e6, 250e6)), float(rng.uniform(55, 95))
    mr_for, pet_for = uid(entropy, "for-mr"), uid(entropy, "for-pet")
    dicom = folder / "DICOM"
    write_series(dicom, raw.t1, raw.t1_affine, SeriesHeader(
        "MR", "t1_mprage_sag_p2_iso", 3, sid, study, mr_for, f"{entropy}-t1", mr_tags()))
    # A 3-slice localizer: an MR series that is not the T1 and must be ignored.
    mid = raw.t1.shape[2] // 2
    write_series(dicom, raw.t1[:, :, mid - 1:mid + 2], raw.t1_affine @ _shift_k(mid - 1),
                 SeriesHeader("MR", "localizer", 1, sid, study, mr_for, f"{entropy}-loc"))
    # PET as scanners store it: rows along +x LPS (patient left), columns posterior.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [raw.pet.ld.shape[0] - 1, raw.pet.ld.shape[1] - 1]
    affine = raw.pet.affine @ flip
    for number, (volume, dose) in enumerate(((raw.pet.sd, 1.0), (raw.pet.ld, profile.dose)), start=5):
        meta = _pet_meta(profile, dose, injected, weight)
        bqml = volume[::-1, ::-1, :] * 1000.0  # the simulator's kBq/mL -> Bq/mL
        write_series(dicom, bqml, affine, SeriesHeader(
            "PT", meta["description"], number, sid, study, pet_for, f"{entropy}-pet{number}",
            pet_tags("BQML", meta["frame_s"], injected, weight, volume.shape[2])))


def _shift_k(k: int) -> np.ndarray:
    m = np.eye(4)
    m[2, 3] = k
    return m


def _write_nifti_subject(folder: Path, raw: RawSubject, profile: SiteProfile,
                         rng: np.random.Generator) -> None:
    injected, weight = float(rng.uniform(150e6, 250e6)), float(rng.uniform(55, 95))
    nifti = folder / "nifti"
    save_volume(nifti / "t1_mprage_sag.nii.gz", raw.t1, raw.t1_affine)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = raw.pet.ld.shape[0] - 1
    affine = raw.pet.affine @ flip  # LAS storage: voxel x runs right to left
    for name, volume, dose in (("pet_standard_dose", raw.pet.sd, 1.0),
                               ("pet_low_dose", raw.pet.ld, profile.dose)):
        meta = _pet_meta(profile, dose, injected, weight)
        save_volume(nifti / f"{name}.nii.gz", volume[::-1] * 1000.0, affine)
        sidecar = {"Modality": "PT", "SeriesDescription": meta["description"], "Units": "BQML",
                   "Radiopharmaceutical": "Fluorodeoxyglucose", "RadionuclideTotalDose": injected,
                   "RadionuclideHalfLife": F18_HALF_LIFE_S, "FrameDuration": meta["frame_s"],
                   "DecayCorrection": "START", "PatientWeight": round(weight, 1),
                   "ConversionSoftware": "m2diff simulator"}
        (nifti / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def generate_exports(gen_cfg: Mapping[str, Any], export_cfg: Mapping[str, Any], out: Path,
                     seed: int, progress: bool = False) -> list[Path]:
    """Write one raw export folder per planned site under ``out`` and ``out/truth/<site>.json``.

    Returns the export folders. Raises ConfigError for bad settings, OSError when ``out``
    cannot be written. Same seed -> same files.
    """
    settings = read_export_settings(gen_cfg, export_cfg)
    check_coverage(settings.pet)
    seed = int(seed)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = load_templates()
    plans = plan_sites(settings.pet, seed)
    total = sum(len(p.diagnoses) for p in plans)
    bar = task = None
    if progress:
        from m2diff.progress import progress_bar
        bar = progress_bar()
        bar.start()
        task = bar.add_task("export", total=total)
    folders = []
    try:
        for plan in plans:
            site = out / plan.name
            truth, rows = {}, []
            for i, (sid, dx) in enumerate(zip(plan.subject_ids(), plan.diagnoses, strict=True)):
                label = sid.removeprefix("sub-")
                entropy = (seed, _RAW_STREAM, plan.index, i)
                raw = simulate_raw_subject(settings.pet, plan.profile, dx,
                                           np.random.SeedSequence(list(entropy)), templates,
                                           settings.t1, settings.max_rotation_deg,
                                           settings.max_shift_mm)
                rng = np.random.default_rng(np.random.SeedSequence([*entropy, 7]))
                as_dicom = settings.dicom_every > 0 and i % settings.dicom_every == 0
                if as_dicom:
                    _write_dicom_subject(site / label, label, raw, plan.profile, rng,
                                         "-".join(map(str, entropy)))
                else:
                    _write_nifti_subject(site / label, raw, plan.profile, rng)
                rows.append({"participant_id": label, "diagnosis": dx,
                             "age": f"{rng.uniform(58, 84):.0f}"})
                truth[sid] = {"pet_to_t1_ras": raw.pet_to_t1.tolist(),
                              "format": "dicom" if as_dicom else "nifti",
                              "diagnosis": dx, "dose": plan.profile.dose}
                if bar is not None:
                    bar.update(task, advance=1, description=f"export {plan.name}/{label}")
            with open(site / "participants.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["participant_id", "diagnosis", "age"])
                writer.writeheader()
                writer.writerows(rows)
            (out / "truth").mkdir(exist_ok=True)
            (out / "truth" / f"{plan.name}.json").write_text(json.dumps(truth, indent=1) + "\n")
            folders.append(site)
    finally:
        if bar is not None:
            bar.stop()
    return folders
