"""A site folder in the docs/METHOD.md layout (section 4): subjects, participants.tsv and file paths.

```
site/
  participants.tsv          participant_id, diagnosis (CN|AD), optional split
  sub-001/anat/sub-001_T1w.nii.gz
  sub-001/pet/sub-001_rec-lowdose_pet.nii.gz
  sub-001/pet/sub-001_rec-standard_pet.nii.gz   (absent where only inference runs)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DIAGNOSES = ("CN", "AD")
SPLITS = ("train", "val", "test")
PARTICIPANTS = "participants.tsv"


def t1_path(site: Path, subject_id: str) -> Path:
    return site / subject_id / "anat" / f"{subject_id}_T1w.nii.gz"


def ld_path(site: Path, subject_id: str) -> Path:
    return site / subject_id / "pet" / f"{subject_id}_rec-lowdose_pet.nii.gz"


def sd_path(site: Path, subject_id: str) -> Path:
    return site / subject_id / "pet" / f"{subject_id}_rec-standard_pet.nii.gz"


@dataclass(frozen=True)
class Subject:
    """One participant of a site; paths are absolute. ``sd`` is None for inference-only data."""

    id: str
    diagnosis: str  # "CN" | "AD"
    t1: Path | None
    ld: Path
    sd: Path | None
    split: str | None = None  # from participants.tsv, else assigned by dataset.split_subjects


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site: which subject, which file, what. Never holds voxel data."""

    site: str
    subject: str | None
    file: str | None
    message: str

    def __str__(self) -> str:
        where = self.site
        if self.subject:
            where += f"/{self.subject}"
        if self.file:
            where += f": {self.file}"
        return f"{where}: {self.message}"


@dataclass
class Site:
    """A site folder with its usable subjects (those that passed validation)."""

    root: Path
    name: str
    subjects: list[Subject] = field(default_factory=list)

    def cohort(self, diagnosis: str) -> list[Subject]:
        return [s for s in self.subjects if s.diagnosis == diagnosis]


def write_participants(site: Path, rows: list[dict[str, str]]) -> None:
    """Write participants.tsv with columns participant_id, diagnosis[, split]."""
    columns = ["participant_id", "diagnosis"] + (["split"] if any("split" in r for r in rows) else [])
    lines = ["\t".join(columns)] + ["\t".join(r.get(c, "") for c in columns) for r in rows]
    (site / PARTICIPANTS).write_text("\n".join(lines) + "\n")
