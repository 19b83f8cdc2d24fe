"""Prepare one subject: read its volumes, register, resample, write the site files.

Everything is read and checked first, the files are written last (each atomically), so a
subject that fails is never half-written. The PET's grid, turned to the orientation
closest to RAS (a lossless reordering of axes), is the subject's grid: LD as it is, SD
resampled onto it if its grid differs, the T1 registered rigidly to the PET (SD when
present: more counts) and resampled onto it (anti-aliased, linear).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from m2diff.data.layout import ld_path, sd_path, t1_path
from m2diff.data.nifti import as_3d, save_volume
from m2diff.prepare.dicom_series import SeriesError, load_series
from m2diff.prepare.discover import ROLE_NAMES, Candidate, find_volumes
from m2diff.prepare.geometry import GridError, canonical, check_affine, to_sitk
from m2diff.prepare.qc import subject_figure
from m2diff.prepare.register import (
    Registration,
    RegistrationSettings,
    pet_brain,
    register_rigid,
    resample,
)
from m2diff.prepare.sidecar import counts_fraction, source_fields
from m2diff.report import write_json

AFFINE_TOL_MM = 1e-3  # as m2diff.data.validate


class SubjectError(ValueError):
    """Why a subject cannot be prepared (one line, names the series)."""


@dataclass
class Loaded:
    data: np.ndarray  # (X, Y, Z) float32, canonical orientation
    affine: np.ndarray  # (4, 4) RAS
    fields: dict[str, Any]  # BIDS fields from the source (PET only)
    label: str


@dataclass
class Outcome:
    """What happened to one subject: ``ok``, the notes a person should read, the
    registration (when it ran) and the QC picture (when one was drawn)."""

    ok: bool
    message: str = ""
    notes: list[str] = field(default_factory=list)
    registration: dict[str, Any] | None = None
    qc: Path | None = None


def load_candidate(candidate: Candidate, role: str) -> Loaded:
    """Read a DICOM series or NIfTI file as a canonical 3D float32 volume; SubjectError."""
    name = ROLE_NAMES[role]
    header = None
    try:
        if candidate.series is not None:
            data, affine, header = load_series(candidate.series)
        else:
            img = nib.load(str(candidate.path))
            shape = tuple(int(n) for n in img.shape)
            if len(shape) == 4 and shape[3] > 1:
                raise SubjectError(f"{name} {candidate.label}: 4D with {shape[3]} frames; "
                                   "prepare takes one static frame (export it alone)")
            data = as_3d(np.asarray(img.get_fdata(dtype=np.float32)))
            affine = np.asarray(img.affine, dtype=np.float64)
        check_affine(affine)
    except SubjectError:
        raise
    except SeriesError as exc:
        raise SubjectError(f"{name} {candidate.label}: {exc}") from None
    except GridError as exc:
        raise SubjectError(f"{name} {candidate.label}: {exc}") from None
    except Exception as exc:  # nibabel: foreign, truncated or damaged files
        raise SubjectError(f"{name} {candidate.label}: unreadable "
                           f"({type(exc).__name__})") from None
    if not np.all(np.isfinite(data)):
        raise SubjectError(f"{name} {candidate.label}: NaN/inf voxels")
    if min(data.shape) < 2 or float(data.max()) == float(data.min()):
        raise SubjectError(f"{name} {candidate.label}: empty or constant volume")
    data, affine = canonical(data, affine)
    fields = source_fields(candidate, header) if role != "t1" else {}
    return Loaded(data, affine, fields, candidate.label)


def _same_grid(a: Loaded, b: Loaded) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, rtol=0, atol=AFFINE_TOL_MM)


def prepare_subject(folder: Path, subject: str, site: Path, patterns: dict,
                    settings: RegistrationSettings, require_sd: bool, require_t1: bool,
                    qc_png: Path, files: list[Path] | None = None) -> Outcome:
    """Prepare ``folder`` (one subject's export) as ``subject`` in ``site``; never raises
    for bad data (the Outcome says what went wrong)."""
    found = find_volumes(folder, patterns, files)
    if found.problems:
        return Outcome(False, "; ".join(found.problems))
    required = {"ld": True, "sd": require_sd, "t1": require_t1}
    for role in ("ld", "sd", "t1"):
        if role not in found.volumes and required[role]:
            hint = "" if role != "sd" else " (data.require_sd=false prepares an inference-only site)"
            return Outcome(False, f"no {ROLE_NAMES[role]} found (no series matches "
                                  f"prepare.roles.{role}){hint}")
    try:
        vols = {role: load_candidate(c, role) for role, c in found.volumes.items()}
    except SubjectError as exc:
        return Outcome(False, str(exc))
    notes: list[str] = []
    ld, sd, t1 = vols["ld"], vols.get("sd"), vols.get("t1")
    pet_ld = to_sitk(ld.data, ld.affine)
    if sd is not None and not _same_grid(sd, ld):
        moved = resample(to_sitk(sd.data, sd.affine), pet_ld, sitk.Transform(), antialias=False)
        notes.append(f"standard-dose PET {sd.data.shape} resampled onto the low-dose PET's "
                     f"grid {ld.data.shape} (same scanner frame assumed)")
        sd = Loaded(sitk.GetArrayFromImage(moved).transpose(2, 1, 0), ld.affine, sd.fields,
                    sd.label)
        sd.fields["ResampledOntoLowDoseGrid"] = True
    reference = sd if sd is not None else ld
    pet_ref = to_sitk(reference.data, reference.affine)
    spacing = np.linalg.norm(ld.affine[:3, :3], axis=0)
    brain = pet_brain(reference.data, spacing)

    registration: Registration | None = None
    t1_on_pet = None
    if t1 is not None:
        t1_img = to_sitk(t1.data, t1.affine)
        registration = register_rigid(pet_ref, t1_img, settings, brain)
        failed = registration.nmi < settings.min_nmi
        title = (f"{site.name}/{subject}: NMI {registration.nmi:.3f}, rotation "
                 f"{registration.rotation_deg:.1f} deg, shift "
                 f"{np.linalg.norm(registration.pet_to_t1[:3, 3]):.1f} mm"
                 + ("  FAILED: left out" if failed else ""))
        qc = subject_figure(pet_ref, t1_img, registration.transform, brain, title, failed, qc_png)
        if failed:
            return Outcome(False, f"registration failed: normalised mutual information "
                                  f"{registration.nmi:.3f} < prepare.registration.min_nmi "
                                  f"{settings.min_nmi} (T1 {t1.label}); see {qc}",
                           notes, registration.summary(), qc)
        t1_on_pet = sitk.GetArrayFromImage(
            resample(t1_img, pet_ld, registration.transform)).transpose(2, 1, 0)

    source = {"ld": ld.label, "sd": sd.label if sd else None, "t1": t1.label if t1 else None}
    reg = registration.summary() if registration else None
    if reg:
        reg["Reference"] = "standard-dose PET" if reference is sd else "low-dose PET"
    for role, vol, path in (("ld", ld, ld_path(site, subject)), ("sd", sd, sd_path(site, subject))):
        if vol is None:
            continue
        save_volume(path, vol.data, ld.affine)
        fields = dict(vol.fields)
        if role == "ld" and sd is not None:
            fraction = counts_fraction(ld.fields, sd.fields)
            if fraction is not None:
                fields["CountsFraction"] = fraction
        fields["M2DiffPrepare"] = {"Source": source[role], "Role": ROLE_NAMES[role],
                                   "Reoriented": "closest to RAS (axes reordered/flipped, no interpolation)",
                                   "T1Registration": reg}
        write_json(path.with_name(path.name.replace(".nii.gz", ".json")), fields)
    if t1_on_pet is not None:
        save_volume(t1_path(site, subject), t1_on_pet, ld.affine)
    return Outcome(True, "", notes, reg, qc_png if registration else None)
