"""Which of a subject's series is the T1, the low-dose PET and the standard-dose PET.

Below a subject's export folder every DICOM file is grouped into series (any nesting, any
file names) and every ``*.nii`` / ``*.nii.gz`` file is a candidate volume. A DICOM series
can be the T1 when its Modality is MR, a PET when it is PT; it gets the role whose pattern
(``prepare.roles``) matches its description or protocol name. A NIfTI file gets the role
whose pattern matches its file name (the modality from a JSON sidecar beside it, when
there is one, narrows the roles as for DICOM). Anything matching no role is ignored
(localizers, other sequences); two candidates for one role, or one candidate for two
roles, is a problem for a person to settle, never a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2diff.config import ConfigError
from m2diff.prepare.dicom_series import Series, scan_series

ROLES = ("t1", "ld", "sd")
ROLE_NAMES = {"t1": "T1w MRI", "ld": "low-dose PET", "sd": "standard-dose PET"}
_MODALITY_ROLES = {"MR": ("t1",), "PT": ("ld", "sd")}
_NIFTI = (".nii", ".nii.gz")


@dataclass
class Candidate:
    """One volume that may fill a role: a DICOM ``series`` or a NIfTI ``path``."""

    label: str  # how a person recognises it, relative to the subject's folder
    series: Series | None = None
    path: Path | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)  # NIfTI's JSON sidecar, if any


@dataclass
class Found:
    """A subject's volumes by role (at most one each) and what stood in the way."""

    volumes: dict[str, Candidate]
    problems: list[str]


def compile_roles(roles: Mapping[str, Sequence[str]]) -> dict[str, list[re.Pattern]]:
    """``prepare.roles`` as compiled patterns; ConfigError names a bad one."""
    out = {}
    for role in ROLES:
        patterns = roles.get(role) if roles else None
        if not patterns:
            raise ConfigError(f"prepare.roles.{role} must list at least one pattern")
        try:
            out[role] = [re.compile(str(p), re.IGNORECASE) for p in patterns]
        except re.error as exc:
            raise ConfigError(f"prepare.roles.{role}: bad pattern ({exc})") from None
    return out


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _roles_of(text: str, allowed: Sequence[str], patterns: Mapping[str, list[re.Pattern]]) -> list[str]:
    words = _words(text)
    return [r for r in allowed if any(p.search(words) for p in patterns[r])]


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _sidecar(path: Path) -> dict[str, Any]:
    side = path.with_name(_nifti_stem(path) + ".json")
    try:
        value = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def list_files(folder: Path) -> list[Path]:
    """Every regular file below ``folder`` (hidden ones skipped), sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def find_volumes(folder: Path, patterns: Mapping[str, list[re.Pattern]],
                 files: list[Path] | None = None) -> Found:
    """Assign the subject's series under ``folder`` to roles; see the module docstring."""
    files = list_files(folder) if files is None else files
    nifti = [p for p in files if p.name.lower().endswith(_NIFTI)]
    skip = set(nifti)
    rest = [p for p in files
            if p not in skip and p.suffix.lower() not in (".json", ".csv", ".tsv", ".txt")]
    series, _ = scan_series(rest)
    by_role: dict[str, list[Candidate]] = {r: [] for r in ROLES}
    problems: list[str] = []
    for s in series:
        allowed = _MODALITY_ROLES.get(s.modality, ())
        roles = _roles_of(s.description, allowed, patterns)
        rel = {str(p.parent.relative_to(folder)) for p in s.files}
        candidate = Candidate(label=f"DICOM series {s.label} in {', '.join(sorted(rel))}/", series=s)
        _place(candidate, roles, by_role, problems)
    for path in nifti:
        sidecar = _sidecar(path)
        modality = str(sidecar.get("Modality", "")).upper()
        allowed = _MODALITY_ROLES.get(modality, ROLES)
        candidate = Candidate(label=f"NIfTI {path.relative_to(folder)}", path=path, sidecar=sidecar)
        _place(candidate, _roles_of(_nifti_stem(path), allowed, patterns), by_role, problems)
    volumes = {}
    for role, found in by_role.items():
        if len(found) > 1:
            problems.append(f"{len(found)} candidates could be the {ROLE_NAMES[role]}: "
                            + "; ".join(c.label for c in found)
                            + " (keep one in the export, or narrow prepare.roles)")
        elif found:
            volumes[role] = found[0]
    return Found(volumes, problems)


def _place(candidate: Candidate, roles: list[str], by_role: dict[str, list[Candidate]],
           problems: list[str]) -> None:
    if len(roles) > 1:
        problems.append(f"{candidate.label} matches several roles "
                        f"({', '.join(ROLE_NAMES[r] for r in roles)}); rename it or narrow prepare.roles")
    elif roles:
        by_role[roles[0]].append(candidate)
