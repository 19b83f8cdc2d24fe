"""The sha256 of a Flower app bundle (FAB), as Flower itself computes it.

``flwr run APP`` builds the FAB with ``flwr.cli.build.build_fab_from_disk(APP)`` (the app
folder's files minus .gitignore'd ones and Flower's own excludes, in sorted order, with
fixed zip timestamps, so the bytes depend on the files only) and the SuperLink stores
``Fab.hash_str = hashlib.sha256(fab_bytes).hexdigest()``: the same hex string
``flwr ls --format json`` shows as ``fab-hash``, the SuperNode receives with the app, and
``m2diff-client fab-hash`` prints for a vetted release. m2diff-server prints and records
it for every run it submits (server/coordinator.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def fab_bytes(app_dir: Path) -> bytes:
    """The FAB ``flwr run`` would build from ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def fab_sha256(app_dir: Path) -> str:
    """Hex sha256 of that FAB (64 lower-case hex digits)."""
    return hashlib.sha256(fab_bytes(app_dir)).hexdigest()
