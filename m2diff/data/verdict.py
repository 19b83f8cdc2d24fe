"""Validate a site once per change of its files, not once per federated round.

``validate_site`` reads every volume in full (NaN and constant checks); a ClientApp that
runs it before every train and evaluate message re-reads the whole site each round. The
verdict (usable subjects and problems) depends only on participants.tsv and the three
expected volumes of every ``sub-*`` folder, so it is cached in the site's cache folder
under a key of those files' (path, size, mtime) and the validation settings: any added,
removed, replaced or touched file, or other settings, means a fresh validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from m2diff.data.cache import (
    cache_folder,
    cache_key,
    cache_path,
    file_stamp,
    load_cached,
    save_cached,
)
from m2diff.data.layout import PARTICIPANTS, Problem, Site, Subject, ld_path, sd_path, t1_path
from m2diff.data.validate import validate_site

_FORMAT = 1


def validate_site_cached(root: Path, cache_dir: str | os.PathLike | None = None,
                         require_sd: bool = True, require_t1: bool = True
                         ) -> tuple[Site, list[Problem]]:
    """``validate_site`` with its verdict cached (see module doc); same result, same errors."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        return validate_site(root, require_sd=require_sd, require_t1=require_t1)
    key = cache_key({"format": _FORMAT, "require_sd": require_sd, "require_t1": require_t1,
                     "files": _stamps(root)})
    site_tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    path = cache_path(cache_folder(root, cache_dir), f"validation-{site_tag}", key)
    cached = load_cached(path, key)
    if cached is not None and "verdict" in cached:
        try:
            return _decode(root, json.loads(str(cached["verdict"])))
        except (ValueError, KeyError, TypeError):
            pass  # damaged: validate again and overwrite
    site, problems = validate_site(root, require_sd=require_sd, require_t1=require_t1)
    save_cached(path, key, {"verdict": np.array(json.dumps(_encode(site, problems)))})
    return site, problems


def _stamps(root: Path) -> list[object]:
    """Stamps of what validation reads: participants.tsv and each subject's three volumes."""
    def stamp(p: Path) -> object:
        return file_stamp(p) if p.exists() else [str(p), None]

    stamps = [stamp(root / PARTICIPANTS)]
    for folder in sorted(p.name for p in root.iterdir() if p.name.startswith("sub-") and p.is_dir()):
        stamps += [stamp(f(root, folder)) for f in (t1_path, ld_path, sd_path)]
    return stamps


def _encode(site: Site, problems: list[Problem]) -> dict:
    def rel(p: Path | None) -> str | None:
        return None if p is None else str(p.relative_to(site.root))

    return {"name": site.name,
            "subjects": [{"id": s.id, "diagnosis": s.diagnosis, "t1": rel(s.t1), "ld": rel(s.ld),
                          "sd": rel(s.sd), "split": s.split} for s in site.subjects],
            "problems": [[p.site, p.subject, p.file, p.message] for p in problems]}


def _decode(root: Path, data: dict) -> tuple[Site, list[Problem]]:
    def absolute(p: str | None) -> Path | None:
        return None if p is None else root / p

    subjects = [Subject(s["id"], s["diagnosis"], absolute(s["t1"]), root / s["ld"],
                        absolute(s["sd"]), s["split"]) for s in data["subjects"]]
    return Site(root, data["name"], subjects), [Problem(*p) for p in data["problems"]]
