"""The hospital's spreadsheet: who is who (participant id, diagnosis, optional split).

A .csv (comma) or .tsv (tab) file, UTF-8 (a BOM is fine), with a header row naming at
least ``participant_id`` and ``diagnosis`` (case-insensitive; other columns are ignored).
Ids are matched to export folders after the BIDS rule: ``sub-`` plus the letters and digits
of the id, so ``001``, ``sub-001`` and ``SUB_001`` are one subject. Diagnosis CN or AD
(any case); split train / val / test or empty. Every bad row is a problem naming its line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from m2diff.data.layout import DIAGNOSES, SPLITS

REQUIRED = ("participant_id", "diagnosis")


class SpreadsheetError(ValueError):
    """The spreadsheet as a whole cannot be used; the message names the file."""


@dataclass(frozen=True)
class Row:
    subject: str  # the BIDS id, sub-<label>
    diagnosis: str  # CN | AD
    split: str  # "" or train | val | test
    line: int


def bids_id(raw: str) -> str:
    """``sub-<label>`` with only the letters and digits of ``raw`` (a ``sub-`` prefix dropped
    first); empty when nothing is left."""
    label = re.sub(r"^sub[-_]", "", raw.strip(), flags=re.IGNORECASE)
    label = re.sub(r"[^A-Za-z0-9]", "", label)
    return f"sub-{label}" if label else ""


def read_spreadsheet(path: Path) -> tuple[dict[str, Row], list[tuple[str | None, str]]]:
    """Rows by BIDS id and problems as (subject or None, message). Raises SpreadsheetError."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpreadsheetError(f"{path}: unreadable ({type(exc).__name__})") from None
    delimiter = "," if Path(path).suffix.lower() == ".csv" else "\t"
    lines = text.splitlines()
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise SpreadsheetError(f"{path}: empty file") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        sep = "comma" if delimiter == "," else "tab"
        raise SpreadsheetError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"({sep}-separated header has {', '.join(header) or 'nothing'})")
    col = {c: header.index(c) for c in header}
    rows: dict[str, Row] = {}
    problems: list[tuple[str | None, str]] = []
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        cells = {c: (values[i].strip() if i < len(values) else "") for c, i in col.items()}
        sid = bids_id(cells["participant_id"])
        where = f"{Path(path).name} line {line}"
        if not sid:
            problems.append((None, f"{where}: empty participant_id; row skipped"))
            continue
        diagnosis = cells["diagnosis"].upper()
        split = cells.get("split", "").lower()
        split = "" if split in ("", "n/a", "na", "none") else split
        if diagnosis not in DIAGNOSES:
            problems.append((sid, f"{where}: diagnosis '{cells['diagnosis']}' is not one of "
                                  f"{', '.join(DIAGNOSES)}; skipped"))
        elif split and split not in SPLITS:
            problems.append((sid, f"{where}: split '{cells['split']}' is not one of "
                                  f"{', '.join(SPLITS)} (or empty); skipped"))
        elif sid in rows:
            problems.append((sid, f"{where}: listed again (first on line {rows[sid].line}); "
                                  "the first row is used"))
        else:
            rows[sid] = Row(sid, diagnosis, split, line)
    return rows, problems
