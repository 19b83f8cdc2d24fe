"""A whole export -> a site folder, incrementally.

The export holds one folder per subject (its name is the subject's id, matched to the
spreadsheet by subject.bids_id); the site gets the layout of m2diff.data.layout plus
``derivatives/prepare/<id>.json`` (what was done, from which inputs) and
``derivatives/qc/`` (one picture per subject, ``contact-sheet.png`` for all). A subject is
prepared again only when its export files (names, sizes, modification times) or the
settings changed; a failed one is reported again from its record without redoing it.
A subject no longer in the export or the spreadsheet loses its prepared files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2diff.data.layout import PARTICIPANTS, Problem
from m2diff.prepare.discover import compile_roles, list_files
from m2diff.prepare.register import RegistrationSettings
from m2diff.prepare.spreadsheet import Row, SpreadsheetError, bids_id, read_spreadsheet
from m2diff.prepare.subject import Outcome, prepare_subject
from m2diff.report import _atomic_write, write_json

STATE = Path("derivatives") / "prepare"
QC = Path("derivatives") / "qc"
CONTACT_SHEET = QC / "contact-sheet.png"
_VERSION = 1  # bump when the output of the same inputs changes


class PrepareError(ValueError):
    """The export, the spreadsheet or the output folder cannot be used at all."""


@dataclass
class SiteResult:
    """``prepared``: ids done in this run; ``unchanged``: done before and still valid;
    ``failed``: id -> reason; ``problems``: every problem (spreadsheet, export, subjects);
    ``notes``: things done that a person should know (resampling, removals)."""

    site: Path
    prepared: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    registrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def usable(self) -> list[str]:
        return sorted(self.prepared + self.unchanged)


def find_spreadsheet(src: Path, given: Path | None) -> Path:
    """The spreadsheet to use: ``given``, else participants.tsv / .csv in ``src``."""
    if given is not None:
        if not given.is_file():
            raise PrepareError(f"participants file {given} does not exist")
        return given
    for name in ("participants.tsv", "participants.csv"):
        if (src / name).is_file():
            return src / name
    raise PrepareError(f"no spreadsheet: give participants=FILE.csv|tsv or put "
                       f"participants.tsv (or .csv) in {src}")


def _check_folders(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise PrepareError(f"export folder {src} does not exist or is not a folder")
    if out == src or src in out.parents or out in src.parents:
        raise PrepareError(f"out={out} must not be the export folder, inside it, or hold it")
    if out.exists() and any(out.iterdir()) and not (out / STATE).is_dir():
        raise PrepareError(f"{out} exists, is not empty and was not written by m2diff prepare; "
                           "choose a new folder")


def _fingerprint(folder: Path, files: list[Path], settings_key: str) -> str:
    h = hashlib.sha256(settings_key.encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def settings_key(prepare_cfg: Mapping[str, Any], require_sd: bool, require_t1: bool) -> str:
    """What the outputs depend on besides the inputs, as a stable string."""
    return json.dumps({"v": _VERSION, "roles": {k: list(v) for k, v in prepare_cfg["roles"].items()},
                       "registration": dict(prepare_cfg["registration"]),
                       "require_sd": require_sd, "require_t1": require_t1}, sort_keys=True)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _remove_outputs(out: Path, sid: str) -> bool:
    removed = False
    if (out / sid).is_dir():
        shutil.rmtree(out / sid)
        removed = True
    for path in (out / QC / f"{sid}.png", out / STATE / f"{sid}.json"):
        if path.exists():
            path.unlink()
    return removed


def export_subjects(src: Path, name: str, problems: list[Problem]) -> dict[str, Path]:
    """Subject folders of the export by BIDS id; clashing names are problems."""
    folders: dict[str, list[Path]] = {}
    for path in sorted(src.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name != "derivatives":
            sid = bids_id(path.name)
            if sid:
                folders.setdefault(sid, []).append(path)
    out = {}
    for sid, paths in folders.items():
        if len(paths) > 1:
            problems.append(Problem(name, sid, None, "export folders "
                                    + ", ".join(p.name for p in paths)
                                    + " all name this subject; skipped"))
        else:
            out[sid] = paths[0]
    return out


def prepare_site(src: Path, out: Path, participants: Path | None, prepare_cfg: Mapping[str, Any],
                 require_sd: bool = True, require_t1: bool = True,
                 report: Callable[[str, Outcome | None, bool], None] | None = None) -> SiteResult:
    """Prepare every subject of the export ``src`` into the site folder ``out``.

    ``report(subject, outcome, unchanged)`` is called after each subject (for progress
    lines). Raises PrepareError when nothing can be done (no export, no spreadsheet, an
    output folder that is not ours); every subject-level problem is in the result instead.
    """
    src, out = Path(src).absolute(), Path(out).absolute()
    _check_folders(src, out)
    patterns = compile_roles(prepare_cfg["roles"])
    settings = RegistrationSettings.from_cfg(prepare_cfg["registration"])
    sheet = find_spreadsheet(src, participants)
    try:
        rows, sheet_problems = read_spreadsheet(sheet)
    except SpreadsheetError as exc:
        raise PrepareError(str(exc)) from None
    name = out.name
    result = SiteResult(site=out)
    result.problems += [Problem(name, sid, sheet.name, msg) for sid, msg in sheet_problems]
    flagged = {sid for sid, _ in sheet_problems if sid}
    folders = export_subjects(src, name, result.problems)
    for sid in sorted(set(folders) - set(rows) - flagged):
        result.problems.append(Problem(name, sid, str(folders[sid].relative_to(src)),
                                       f"scans in the export but no row in {sheet.name}; skipped"))
    for sid in sorted(set(rows) - set(folders)):
        result.problems.append(Problem(name, sid, sheet.name,
                                       "listed in the spreadsheet but the export has no folder "
                                       "for it; skipped"))
    (out / STATE).mkdir(parents=True, exist_ok=True)
    key = settings_key(prepare_cfg, require_sd, require_t1)
    wanted = sorted(set(rows) & set(folders))
    for sid in wanted:
        folder = folders[sid]
        files = list_files(folder)
        fingerprint = _fingerprint(folder, files, key)
        record_path = out / STATE / f"{sid}.json"
        record = _read_record(record_path) if record_path.is_file() else None
        if record and record.get("fingerprint") == fingerprint and (
                not record.get("ok") or (out / sid).is_dir()):
            outcome = Outcome(bool(record["ok"]), record.get("message", ""),
                              list(record.get("notes", [])), record.get("registration"))
            unchanged = True
        else:
            outcome = prepare_subject(folder, sid, out, patterns, settings, require_sd,
                                      require_t1, out / QC / f"{sid}.png", files)
            unchanged = False
            if not outcome.ok and (out / sid).is_dir():
                shutil.rmtree(out / sid)
                outcome.notes.append("its earlier prepared files were removed")
            write_json(record_path, {"fingerprint": fingerprint, "ok": outcome.ok,
                                     "message": outcome.message, "notes": outcome.notes,
                                     "registration": outcome.registration,
                                     "export_folder": folder.name})
        if outcome.ok:
            (result.unchanged if unchanged else result.prepared).append(sid)
        else:
            result.failed[sid] = outcome.message
            result.problems.append(Problem(name, sid, folder.name, outcome.message
                                           + (" (unchanged since the last run)" if unchanged else "")))
        if outcome.registration:
            result.registrations[sid] = outcome.registration
        result.notes += [f"{sid}: {n}" for n in outcome.notes]
        if report is not None:
            report(sid, outcome, unchanged)
    for path in sorted((out / STATE).glob("sub-*.json")):
        sid = path.stem
        if sid not in wanted:
            _remove_outputs(out, sid)
            result.notes.append(f"{sid}: no longer in the export or the spreadsheet; "
                                "its prepared files were removed")
    _write_participants(out, [rows[s] for s in result.usable])
    pictures = [out / QC / f"{s}.png" for s in wanted if (out / QC / f"{s}.png").is_file()]
    if pictures:
        from m2diff.prepare.qc import contact_sheet

        contact_sheet(pictures, out / CONTACT_SHEET,
                      f"{name}: T1 edges over PET, {len(result.usable)} prepared, "
                      f"{len(result.failed)} failed (red)")
    return result


def _write_participants(out: Path, rows: list[Row]) -> None:
    columns = ["participant_id", "diagnosis"] + (["split"] if any(r.split for r in rows) else [])
    lines = ["\t".join(columns)]
    for r in rows:
        values = {"participant_id": r.subject, "diagnosis": r.diagnosis, "split": r.split}
        lines.append("\t".join(values[c] for c in columns))
    _atomic_write(out / PARTICIPANTS, lambda fh: fh.write("\n".join(lines) + "\n"))
