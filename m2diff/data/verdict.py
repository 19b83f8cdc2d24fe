"""Validate a site once per change of its files, not once per federated round.

``validate_site`` reads every volume in full (NaN and constant checks); a ClientApp that
runs it before every train and evaluate message re-reads the whole site each round. The
verdict (usable subjects and problems) depends only on participants.tsv and the three
expected volumes of every ``sub-*`` folder, so it is cached in the site's cache folder
under a key of those files' (path, size, mtime) and the validation settings: any added,
removed, replaced or touched file, or other settings, means a fresh validation.

A cached verdict is trusted only with a valid HMAC-SHA256 under a per-site secret kept in the
site's state folder (``verdict.key``, 32 random bytes, mode 0600, made on first use): a verdict
planted in the cache folder (which another account or, before the site policy, the
coordinator's ``data.cache_dir`` could point anywhere) does not skip validation, it is
validated again and overwritten. Without a writable state folder nothing is cached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
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

log = logging.getLogger(__name__)

_FORMAT = 2  # 2: HMAC, symbolic links refused, volume size bound
KEY_FILE = "verdict.key"


def state_folder(root: Path, state_dir: str | os.PathLike | None = None) -> Path:
    """The site's state folder: ``state_dir`` when set, else ``<site>/.m2diff-state``."""
    return Path(state_dir).expanduser().absolute() if state_dir else Path(root) / ".m2diff-state"


def site_secret(state: Path) -> bytes | None:
    """The site's verdict key from ``state`` (made on first use), None when it cannot be
    read or written."""
    path = state / KEY_FILE
    try:
        state.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = path.read_bytes()
        else:
            secret = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        log.warning("no verdict key in %s (%s): the site is validated in full every time", state, exc)
        return None
    return secret if len(secret) == 32 else None


def _mac(secret: bytes, key: str, verdict: str) -> str:
    return hmac.new(secret, f"{key}\n{verdict}".encode(), hashlib.sha256).hexdigest()


def validate_site_cached(root: Path, cache_dir: str | os.PathLike | None = None,
                         require_sd: bool = True, require_t1: bool = True,
                         state_dir: str | os.PathLike | None = None,
                         max_volume_mb: float | None = None) -> tuple[Site, list[Problem]]:
    """``validate_site`` with its verdict cached (see module doc); same result, same errors."""
    root = Path(root).expanduser().absolute()
    settings = {"require_sd": require_sd, "require_t1": require_t1, "max_volume_mb": max_volume_mb}
    secret = site_secret(state_folder(root, state_dir)) if root.is_dir() else None
    if secret is None:
        return validate_site(root, **settings)
    key = cache_key({"format": _FORMAT, **settings, "files": _stamps(root)})
    site_tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    path = cache_path(cache_folder(root, cache_dir), f"validation-{site_tag}", key)
    cached = load_cached(path, key)
    if cached is not None and "verdict" in cached and "mac" in cached:
        verdict = str(cached["verdict"])
        if hmac.compare_digest(str(cached["mac"]), _mac(secret, key, verdict)):
            try:
                return _decode(root, json.loads(verdict))
            except (ValueError, KeyError, TypeError):
                pass  # damaged: validate again and overwrite
        else:
            log.warning("cached verdict %s does not carry this site's signature: validating again",
                        path)
    site, problems = validate_site(root, **settings)
    verdict = json.dumps(_encode(site, problems))
    save_cached(path, key, {"verdict": np.array(verdict),
                            "mac": np.array(_mac(secret, key, verdict))})
    return site, problems


def _stamps(root: Path) -> list[object]:
    """Stamps of what validation reads: participants.tsv and each subject's three volumes."""
    def stamp(p: Path) -> object:
        # The resolved path too: a symbolic link swapped for one leading elsewhere is a change.
        return [*file_stamp(p), os.path.realpath(p)] if p.exists() else [str(p), None]

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
