"""What m2diff-server keeps about its run in the out-dir, shared by serving and ``status``,
and what it prints from it.

``server.json`` (STATE_FILE): the SuperLink's address, CA, pid, run ids, rounds and node
names as m2diff-server last wrote them; ``rounds.json``: the ServerApp's per-round rows,
one console line per finished round (``RoundLines``) and the last round's table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "server.json"


def read_rows(out: Path) -> list[dict[str, Any]]:
    """out/rounds.json (written atomically by the ServerApp); [] when absent or unreadable."""
    try:
        rows = json.loads((out / "rounds.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "round" in r]


def read_state(out: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((out / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def write_state(out: Path, state: dict[str, Any]) -> None:
    from m2diff.report import write_json

    write_json(out / STATE_FILE, state)


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_last_round(out: Path) -> None:
    """The last round's per-site, per-cohort table from out/rounds.json."""
    from m2diff.fedutil import table_columns, table_rows
    from m2diff.report import print_table as rich_table

    path = out / "rounds.json"
    if not path.is_file():
        print(f"m2diff-server: no {path}", file=sys.stderr)
        return
    rows = read_rows(out)
    if rows:
        last = max(int(r["round"]) for r in rows)
        table = table_rows([r for r in rows if int(r["round"]) == last], "federated")
        rich_table(table, f"Held-out test subjects after round {last} ({out})", table_columns(table))


class RoundLines:
    """One line per round that appears in out/rounds.json: round r/N, the sites that answered,
    the round's and the whole command's time."""

    def __init__(self, out: Path, last_round: int, say: Callable[..., None]) -> None:
        self.out, self.last_round, self.say = out, last_round, say
        self.t0 = time.monotonic()
        self.stamp: float | None = None
        rows = read_rows(out)
        self.seen = max((int(r["round"]) for r in rows), default=0)

    def rebase(self) -> None:
        """After a resubmission the ServerApp drops rows after its checkpoint: report again
        from there."""
        self.seen = min(self.seen, max((int(r["round"]) for r in read_rows(self.out)), default=0))
        self.stamp = None

    def check(self) -> None:
        path = self.out / "rounds.json"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return
        if stamp == self.stamp:
            return
        self.stamp = stamp
        rows = read_rows(self.out)
        for rnd in sorted({int(r["round"]) for r in rows if int(r["round"]) > self.seen}):
            these = [r for r in rows if int(r["round"]) == rnd]
            sites = sorted({str(r["site"]) for r in these})
            trained = sorted({str(r["site"]) for r in these if "train_loss" in r})
            secs = float(these[0].get("round_train_s", 0) or 0) + \
                float(these[0].get("round_evaluate_s", 0) or 0)
            extra = "" if trained == sites else f"; trained: {', '.join(trained) or 'none'}"
            self.say(f"round {rnd}/{self.last_round} done in {secs:.0f} s: {len(sites)} site(s) "
                     f"answered ({', '.join(sites)}{extra}); elapsed {clock(time.monotonic() - self.t0)}",
                     style="green")
            self.seen = rnd
