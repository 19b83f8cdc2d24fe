"""On-disk cache of decoded, normalised slices: one .npz per subject, written atomically.

The key hashes the files' paths, sizes and modification times and the settings, so a
changed file or setting misses the cache. A damaged or foreign cache file is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from m2diff.config import resolve_path

log = logging.getLogger(__name__)

_KEY = "__key__"


def cache_folder(site_root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` when set (shared by all sites), else ``<site>/.m2diff-cache``."""
    return resolve_path(cache_dir) or Path(site_root) / ".m2diff-cache"


def file_stamp(path: Path | None) -> list[object] | None:
    """[absolute path, size in bytes, mtime in ns] of a file, or None for no file."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).absolute()), st.st_size, st.st_mtime_ns]


def cache_key(parts: Mapping[str, object]) -> str:
    """Hex digest of JSON-serialisable key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_path(folder: Path, prefix: str, key: str) -> Path:
    return folder / f"{prefix}-{key[:24]}.npz"


def load_cached(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key`` at ``path``; None when absent, stale or damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if _KEY not in f.files or str(f[_KEY]) != key:
                return None
            return {k: np.array(f[k]) for k in f.files if k != _KEY}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring damaged cache file %s (%s); rebuilding", path, type(exc).__name__)
        return None


def save_cached(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Write arrays atomically (tmp + fsync + rename), remove older files of the same prefix.

    Returns False (with a warning) when the folder is not writable: caching is best effort.
    """
    prefix = path.name.rsplit("-", 1)[0]
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, **{_KEY: np.array(key)}, **arrays)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        for old in path.parent.glob(f"{prefix}-*.npz"):
            if old != path and old.name.rsplit("-", 1)[0] == prefix:
                old.unlink(missing_ok=True)
        return True
    except OSError as exc:
        log.warning("cannot write slice cache %s (%s); continuing without it", path, exc)
        return False
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
