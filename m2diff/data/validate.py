"""Validate a site folder: every problem becomes a Problem value, the usable rest still loads.

A subject is usable when its participants.tsv row is sound and its required volumes
(low-dose PET always; T1 and standard-dose PET unless the caller waives them) are readable,
3D, finite, not empty or constant, co-registered (same shape, affine within 1e-3), no
larger than ``max_volume_mb`` by their header (checked before any voxel is read:
m2diff.data.nifti.check_volume_size), and inside the site folder: a symbolic link (file or
subject folder) that leads out of it is refused, so the site reads only what it holds.
Messages name the subject and the file (relative to the site) and never hold voxel values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff.data.layout import (
    DIAGNOSES,
    PARTICIPANTS,
    SPLITS,
    Problem,
    Site,
    Subject,
    ld_path,
    sd_path,
    t1_path,
)
from m2diff.data.nifti import VolumeTooLarge, as_3d, check_volume_size

AFFINE_TOL_MM = 1e-3
REQUIRED_COLUMNS = ("participant_id", "diagnosis")
_NO_SPLIT = ("", "n/a", "na", "none")


@dataclass(frozen=True)
class _Row:
    line: int  # 1-based line number in participants.tsv
    id: str
    diagnosis: str
    split: str


@dataclass(frozen=True)
class _Geometry:
    shape: tuple[int, ...]
    affine: np.ndarray


def validate_site(root: Path, require_sd: bool = True, require_t1: bool = True,
                  max_volume_mb: float | None = None) -> tuple[Site, list[Problem]]:
    """Check a site folder; return the Site with its usable subjects and every Problem found.

    Never raises for bad data. ``require_t1=False`` accepts subjects without (or with a
    broken) T1 MRI for MRI-free use; ``require_sd=False`` accepts subjects without a
    standard-dose PET (inference only). The site having no usable subject is a Problem too.
    ``max_volume_mb`` bounds one volume (None: m2diff.data.nifti.MAX_VOLUME_MB).
    """
    root = Path(root).expanduser().absolute()
    name = root.name or str(root)
    site = Site(root=root, name=name)
    if not root.exists():
        return site, [Problem(name, None, None, f"site folder {root} does not exist")]
    if not root.is_dir():
        return site, [Problem(name, None, None, f"{root} is not a folder")]

    problems: list[Problem] = []
    rows = _read_participants(root, name, problems)
    folders = _subject_folders(root, name, problems)
    outside = {f for f in folders if not inside_site(root, root / f)}
    for folder in sorted(outside):
        problems.append(Problem(name, folder, folder, "subject folder is a symbolic link "
                                "leading outside the site folder; refused"))
    folders -= outside
    if rows is not None:
        listed = {r.id for r in rows}
        for folder in sorted(folders - listed):
            problems.append(Problem(name, folder, PARTICIPANTS,
                                    "subject folder has no row in participants.tsv; skipped"))
        for row in rows:
            if row.id in outside:
                continue
            if row.id not in folders:
                problems.append(Problem(name, row.id, PARTICIPANTS,
                                        "listed in participants.tsv but the subject folder "
                                        "is missing; skipped"))
                continue
            subject = _check_subject(root, name, row, require_sd, require_t1, problems,
                                     max_volume_mb)
            if subject is not None:
                site.subjects.append(subject)
    if not site.subjects:
        problems.append(Problem(name, None, None, "no usable subjects"))
    return site, problems


def inside_site(root: Path, path: Path) -> bool:
    """Whether ``path``, all symbolic links followed, lies inside the site folder ``root``."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _subject_folders(root: Path, name: str, problems: list[Problem]) -> set[str]:
    """Names of the sub-* folders of the site (other folders, e.g. derivatives/, are ignored)."""
    try:
        return {p.name for p in root.iterdir() if p.name.startswith("sub-") and p.is_dir()}
    except OSError as exc:
        problems.append(Problem(name, None, None, f"cannot list the site folder: {_reason(exc)}"))
        return set()


def _read_participants(root: Path, name: str, problems: list[Problem]) -> list[_Row] | None:
    """Sound rows of participants.tsv; None when the file itself is unusable."""
    path = root / PARTICIPANTS
    if path.is_symlink() and not inside_site(root, path):
        problems.append(Problem(name, None, PARTICIPANTS, "a symbolic link leading outside the "
                                "site folder; refused, no subject can be used"))
        return None
    if not path.is_file():
        problems.append(Problem(name, None, PARTICIPANTS,
                                "missing (needed for participant_id and diagnosis); "
                                "no subject can be used"))
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(name, None, PARTICIPANTS, f"unreadable: {_reason(exc)}"))
        return None
    lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(text.splitlines(), start=1)]
    lines = [(i, line) for i, line in lines if line.strip()]
    if not lines:
        problems.append(Problem(name, None, PARTICIPANTS, "empty file; no subject can be used"))
        return None
    header = [c.strip() for c in lines[0][1].split("\t")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(Problem(name, None, PARTICIPANTS,
                                f"missing column(s) {', '.join(missing)} (tab-separated header "
                                f"has {', '.join(header)}); no subject can be used"))
        return None

    parsed: dict[str, list[_Row]] = {}
    for line_no, line in lines[1:]:
        values = [v.strip() for v in line.split("\t")]
        if len(values) > len(header):
            problems.append(Problem(name, values[0] or None, PARTICIPANTS,
                                    f"line {line_no} has {len(values)} fields, the header "
                                    f"{len(header)}; row skipped"))
            continue
        cells = dict(zip(header, values + [""] * (len(header) - len(values)), strict=True))
        row = _Row(line_no, cells["participant_id"], cells["diagnosis"], cells.get("split", ""))
        parsed.setdefault(row.id, []).append(row)

    rows: list[_Row] = []
    for sid, same in parsed.items():
        if not sid:
            problems.append(Problem(name, None, PARTICIPANTS,
                                    f"empty participant_id on line(s) "
                                    f"{', '.join(str(r.line) for r in same)}; row skipped"))
            continue
        if sid != Path(sid).name or sid.startswith("."):
            problems.append(Problem(name, sid, PARTICIPANTS,
                                    f"line {same[0].line}: participant_id is not a plain "
                                    "folder name; skipped"))
            continue
        if len(same) > 1:
            where = ", ".join(str(r.line) for r in same)
            if len({(r.diagnosis.upper(), r.split.lower()) for r in same}) > 1:
                problems.append(Problem(name, sid, PARTICIPANTS,
                                        f"duplicate participant_id with different values "
                                        f"(lines {where}); skipped"))
                continue
            problems.append(Problem(name, sid, PARTICIPANTS,
                                    f"duplicate participant_id (lines {where}); first row used"))
        row = _row_checked(name, same[0], problems)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: r.id)


def _row_checked(name: str, row: _Row, problems: list[Problem]) -> _Row | None:
    """Normalise diagnosis (case-insensitive CN/AD) and split; None when either is unknown."""
    diagnosis = row.diagnosis.upper()
    if diagnosis not in DIAGNOSES:
        label = f"'{row.diagnosis}'" if row.diagnosis else "empty"
        problems.append(Problem(name, row.id, PARTICIPANTS,
                                f"line {row.line}: diagnosis {label} is not one of "
                                f"{', '.join(DIAGNOSES)}; skipped"))
        return None
    split = row.split.lower()
    if split in _NO_SPLIT:
        split = ""
    elif split not in SPLITS:
        problems.append(Problem(name, row.id, PARTICIPANTS,
                                f"line {row.line}: split '{row.split}' is not one of "
                                f"{', '.join(SPLITS)} (or empty); skipped"))
        return None
    return _Row(row.line, row.id, diagnosis, split)


def _check_subject(root: Path, name: str, row: _Row, require_sd: bool, require_t1: bool,
                   problems: list[Problem], max_volume_mb: float | None = None) -> Subject | None:
    """Check the subject's volumes; every file is read once. None when not usable."""
    paths = {"low-dose PET": ld_path(root, row.id), "standard-dose PET": sd_path(root, row.id),
             "T1w MRI": t1_path(root, row.id)}
    required = {"low-dose PET": True, "standard-dose PET": require_sd, "T1w MRI": require_t1}
    geometry: dict[str, _Geometry] = {}
    failed: set[str] = set()
    for kind, path in paths.items():
        rel = str(path.relative_to(root))
        if (path.is_symlink() or path.exists()) and not inside_site(root, path):
            problems.append(Problem(name, row.id, rel, f"{kind}: a symbolic link leading outside "
                                    "the site folder; refused"))
            failed.add(kind)
            continue
        if not path.is_file():
            if required[kind]:
                problems.append(Problem(name, row.id, rel, f"missing {kind}"))
                failed.add(kind)
            continue
        geo, reason = _check_volume(path, max_volume_mb)
        if geo is None:
            note = "" if required[kind] else f"; subject used without its {kind}"
            problems.append(Problem(name, row.id, rel, f"{kind}: {reason}{note}"))
            failed.add(kind)
        else:
            geometry[kind] = geo

    if geometry:
        ref_kind = next(iter(geometry))
        ref = geometry[ref_kind]
        for kind, geo in list(geometry.items())[1:]:
            rel = str(paths[kind].relative_to(root))
            if geo.shape != ref.shape:
                reason = f"shape {geo.shape} differs from the {ref_kind}'s {ref.shape}"
            elif not np.allclose(geo.affine, ref.affine, rtol=0.0, atol=AFFINE_TOL_MM):
                diff = float(np.max(np.abs(geo.affine - ref.affine)))
                reason = (f"affine differs from the {ref_kind}'s by up to {diff:.3g} mm "
                          f"(tolerance {AFFINE_TOL_MM} mm)")
            else:
                continue
            note = "" if required[kind] else f"; subject used without its {kind}"
            problems.append(Problem(name, row.id, rel,
                                    f"{kind} not co-registered: {reason}{note}"))
            failed.add(kind)
            del geometry[kind]

    if any(required[k] for k in failed):
        return None
    ok = set(geometry)
    return Subject(
        id=row.id,
        diagnosis=row.diagnosis,
        t1=paths["T1w MRI"] if "T1w MRI" in ok else None,
        ld=paths["low-dose PET"],
        sd=paths["standard-dose PET"] if "standard-dose PET" in ok else None,
        split=row.split or None,
    )


def _check_volume(path: Path, max_volume_mb: float | None = None
                  ) -> tuple[_Geometry | None, str]:
    """Read one NIfTI fully (after its header passed the size bound); return its geometry,
    or None and why it is unusable."""
    try:
        check_volume_size(path, max_volume_mb)
    except VolumeTooLarge as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"not a readable NIfTI file ({_reason(exc)})"
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign or damaged files
        return None, f"not a readable NIfTI file ({_reason(exc)})"
    shape = tuple(int(n) for n in img.shape)
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) != 3:
        return None, f"expected a 3D volume, got {len(shape)}D with shape {shape}"
    if min(squeezed) < 1:
        return None, f"volume has no voxels (shape {squeezed})"
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return None, "affine (voxel to mm) is not finite or not invertible"
    try:
        data = as_3d(np.asarray(img.get_fdata(dtype=np.float32)))
    except Exception as exc:  # truncated gzip, short data block, unsupported dtype, ...
        return None, f"voxel data unreadable, file truncated or damaged ({_reason(exc)})"
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        return None, f"{bad} NaN/inf voxel(s)"
    lo, hi = float(data.min()), float(data.max())
    if lo == 0.0 and hi == 0.0:
        return None, "empty volume (all voxels zero)"
    if lo == hi:
        return None, "constant volume (all voxels equal)"
    return _Geometry(squeezed, affine), ""


def _reason(exc: BaseException) -> str:
    """One line for an exception: its type and first line, without voxel data."""
    text = str(exc).strip().splitlines()
    first = text[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
