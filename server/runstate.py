"""What m2diff-server keeps about its run in the out-dir, shared by serving and ``status``.

``server.json`` (STATE_FILE): the SuperLink's address, CA, pid, run ids, rounds and node
names as m2diff-server last wrote them; ``rounds.json``: the ServerApp's per-round rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "server.json"


def truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


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
