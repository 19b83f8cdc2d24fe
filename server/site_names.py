"""Site names as the coordinator accepts them, and the run config's node id -> name map.

Kept apart from the strategies (no torch, no Flower strategy imports): ``m2diff-server``'s
coordinator process formats ``registered-sites`` with it, the ServerApp parses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def site_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a site (None: it can): 1-64 characters of ``A-Z a-z 0-9 . _ -``,
    starting with a letter or digit, so it is safe in file names, logs and tables."""
    if SITE_NAME.fullmatch(name):
        return None
    return f"site name {name[:40]!r} is not 1-64 characters of A-Z a-z 0-9 . _ -"


def parse_registered(text: str) -> dict[int, str]:
    """``"123=hospital-a 456=hospital-b"`` (run config ``registered-sites``) -> node id -> name;
    ValueError on anything else."""
    out: dict[int, str] = {}
    for word in str(text or "").split():
        node, sep, name = word.partition("=")
        if not sep or not node.isdigit() or site_name_problem(name):
            raise ValueError(f"registered-sites: {word!r} is not NODE_ID=SITE_NAME")
        out[int(node)] = name
    return out


def format_registered(nodes: Mapping[Any, str]) -> str:
    """The inverse of ``parse_registered`` (names that are not valid site names are left out)."""
    return " ".join(f"{int(k)}={v}" for k, v in sorted(nodes.items(), key=lambda kv: int(kv[0]))
                    if not site_name_problem(str(v)))
