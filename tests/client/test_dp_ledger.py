"""The site's one epsilon ledger (client/dp_ledger.py): locking between processes, the copy,
and the per-federation files of earlier releases."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from client.dp_ledger import Entry, LedgerError, SiteLedger, locked
from m2diff.privacy import epsilon


def _spend(primary: str, copy: str, federation: str, times: int) -> None:
    for _ in range(times):
        with locked(Path(primary)):
            ledger = SiteLedger.open(Path(primary), Path(copy))
            ledger.reserve(Entry(federation, 1.0, 0.1, 1))


def test_concurrent_rounds_never_lose_an_entry(tmp_path):
    primary, copy = tmp_path / "state" / "dp-ledger.json", tmp_path / "cache" / "dp-ledger.json"
    ctx = mp.get_context("fork")  # no re-import of torch: the workers only touch files
    procs = [ctx.Process(target=_spend, args=(str(primary), str(copy), fed, 8))
             for fed in ("aaa", "bbb")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ledger = SiteLedger.open(primary, copy)
    assert len(ledger.entries) == 16 and len(ledger.history("aaa")) == 8
    assert primary.read_text() == copy.read_text()
    # lifetime epsilon composes both federations; each federation's only its own
    assert ledger.epsilon(1e-5) > ledger.epsilon(1e-5, "aaa") == pytest.approx(
        epsilon([(1.0, 0.1, 1)] * 8, 1e-5))


def test_earlier_files_are_imported_and_a_damaged_ledger_refuses(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = cache / "privacy-0123456789ab-site-a.json"
    old.write_text(json.dumps({"accountant": "rdp", "history": [[1.0, 0.5, 60]]}))
    ledger = SiteLedger.open(tmp_path / "state" / "dp-ledger.json", cache / "dp-ledger.json", [old])
    assert [(e.federation, e.steps) for e in ledger.entries] == [("0123456789ab", 60)]
    ledger.reserve(Entry("ffffffffffff", 1.0, 0.5, 10))
    again = SiteLedger.open(ledger.primary, ledger.copy, [old])  # imported once, then kept
    assert [e.steps for e in again.entries] == [60, 10]
    ledger.primary.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable privacy ledger"):
        SiteLedger.open(ledger.primary, ledger.copy)
