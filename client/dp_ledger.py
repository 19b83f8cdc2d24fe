"""The site's epsilon ledger: every DP-SGD round this site ever trained, one file per site.

A hospital's privacy budget is its own, over its lifetime, not per federation: a ledger keyed
by the coordinator's ``out-dir`` gave a site that had refused at its budget a fresh budget as
soon as the coordinator changed that path. So a deployed site keeps ONE ledger:

- ``<state folder>/dp-ledger.json`` (``state-dir=``, default ``<site>/.m2diff-state``), and a
  copy in the site's cache folder; both written atomically (m2diff.report.write_json), the
  primary first. A primary that is gone while its copy exists means the ledger was lost (a
  state folder not on persistent storage, a deleted file): the site refuses to train until
  someone restores it; a copy that is gone (a cleared cache) is simply written again;
- one entry per trained round: ``federation`` (sha256 of the run's out-dir, 12 hex digits: the
  coordinator's own per-federation count), noise multiplier, sample rate, steps, time. The
  site's epsilon is the RDP composition of all entries (``history()``), a federation's that
  of its entries (``history(federation)``);
- an entry is written *before* the round trains (``reserve``), under an exclusive file lock
  (``locked``), so two messages on the same site cannot both spend what is left, and a crash
  after the reservation counts as spent (never the other way round);
- on first use, the per-federation files of earlier releases (``privacy-<fed>-<site>.json`` in
  the cache folder) are imported, so an upgrade does not reset the count.

A virtual site of ``m2diff simulate`` is not a hospital: its ledger is per simulated
federation (``privacy-<fed>-<site>.json`` in the site's cache folder, as before), with the same
locking and reservation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from client.site_errors import SitePolicyError
from m2diff.privacy import History, epsilon, history_of
from m2diff.report import write_json

LEDGER = "dp-ledger.json"
_FORMAT = 1


class LedgerError(SitePolicyError):
    """The site's ledger cannot be trusted (unreadable, or lost with a copy left): no training."""


@dataclass(frozen=True)
class Entry:
    """One trained round: Opacus RDP history entry plus where it was spent."""

    federation: str
    noise: float
    rate: float
    steps: int
    at: str = ""

    def accountant(self) -> tuple[float, float, int]:
        return (float(self.noise), float(self.rate), int(self.steps))


def safe_name(name: str) -> str:
    """A site name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class SiteLedger:
    """The entries of one site (read with ``open``, changed with ``reserve``)."""

    primary: Path
    copy: Path | None
    entries: list[Entry]

    @classmethod
    def open(cls, primary: Path, copy: Path | None, legacy: list[Path] | None = None
             ) -> SiteLedger:
        """Read the ledger (see module doc for a lost primary); raises LedgerError."""
        have_primary, have_copy = primary.exists(), copy is not None and copy.exists()
        if not have_primary and have_copy:
            raise LedgerError(f"privacy ledger {primary} is gone but its copy {copy} exists: the "
                              f"site's spent epsilon would be forgotten; restore it (copy {copy} "
                              f"to {primary}) after checking it; not training")
        entries = _read(primary) if have_primary else []
        if have_copy:
            assert copy is not None
            entries = _union(entries, _read(copy))
        if not have_primary and legacy:
            for path in legacy:
                entries = _union(entries, _legacy(path))
        return cls(primary, copy, entries)

    def history(self, federation: str | None = None) -> History:
        """The accountant history of every entry, or of one federation's."""
        return [e.accountant() for e in self.entries
                if federation is None or e.federation == federation]

    def epsilon(self, delta: float, federation: str | None = None) -> float:
        return epsilon(self.history(federation), delta)

    def reserve(self, entry: Entry) -> None:
        """Append ``entry`` (stamped with the time) and write the ledger and its copy."""
        self.entries.append(Entry(**{**asdict(entry), "at": entry.at or _now()}))
        data = {"format": _FORMAT, "entries": [asdict(e) for e in self.entries]}
        write_json(self.primary, data)
        if self.copy is not None:
            write_json(self.copy, data)


@contextlib.contextmanager
def locked(primary: Path) -> Iterator[None]:
    """An exclusive lock for read-modify-write of the ledger at ``primary`` (blocks)."""
    primary.parent.mkdir(parents=True, exist_ok=True)
    with open(primary.with_name(primary.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> list[Entry]:
    try:
        data = json.loads(path.read_text())
        if "entries" not in data and "history" in data:  # a per-federation file of before
            return [Entry("", s, q, n) for s, q, n in history_of(data)]
        return [Entry(str(e["federation"]), float(e["noise"]), float(e["rate"]), int(e["steps"]),
                      str(e.get("at", ""))) for e in data["entries"]]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LedgerError(f"{path}: unreadable privacy ledger ({exc}); not training") from exc


def _legacy(path: Path) -> list[Entry]:
    """Entries of an older ``privacy-<federation>-<site>.json`` file."""
    federation = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
    try:
        state: Any = json.loads(path.read_text())
        return [Entry(federation, s, q, n) for s, q, n in history_of(state)]
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerError(f"{path}: unreadable privacy state of an earlier release ({exc}); "
                          "not training") from exc


def _union(a: list[Entry], b: list[Entry]) -> list[Entry]:
    """Entries of both, each once, in the order first seen (copies that diverged after a
    crash between the two writes: keep everything, the conservative count)."""
    seen = {asdict(e).__repr__() for e in a}
    return a + [e for e in b if asdict(e).__repr__() not in seen]
