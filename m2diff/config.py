"""Compose the Hydra config from conf/ and key=value overrides.

conf/ is found in a checkout or an unpacked Flower app bundle (``<root>/conf``) and in an
installed wheel (``m2diff/conf``, force-included at build time).

Hydra takes most of a second per composition on a busy 2-core machine, and a site's ClientApp
composes the run's settings for every message. With ``M2DIFF_COMPOSE_CACHE=DIR`` (set by
m2diff-client to a folder in the site's state) a composed config is kept as YAML under a key
made of the overrides, every conf/ file's bytes and the Hydra and OmegaConf versions, so a
change to any of them composes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

_PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A setting that cannot be composed or used; the message names the setting."""


def conf_dir() -> Path:
    """Return the folder holding config.yaml (env M2DIFF_CONF_DIR wins)."""
    candidates = [
        os.environ.get("M2DIFF_CONF_DIR"),
        _PACKAGE_DIR / "conf",
        _PACKAGE_DIR.parent / "conf",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise ConfigError(f"conf/config.yaml not found (looked in {[str(c) for c in candidates if c]})")


def group_options(group: str) -> list[str]:
    """Names of the options of a config group, e.g. ``group_options("model")``."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (``["model=paper", "train.steps=5"]``).

    Raises ConfigError naming the bad override instead of a Hydra traceback. Cached on disk
    with ``M2DIFF_COMPOSE_CACHE`` (module doc).
    """
    cache = os.environ.get(COMPOSE_CACHE_ENV)
    path = Path(cache) / f"{compose_key(overrides)}.yaml" if cache else None
    if path is not None and path.is_file():
        try:
            cfg = OmegaConf.create(path.read_text())
            if isinstance(cfg, DictConfig):
                return cfg
        except Exception:  # noqa: BLE001 - unreadable (e.g. yaml's ParserError): compose again
            pass
    cfg = _compose(overrides)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=False))
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written is only slower
    return cfg


COMPOSE_CACHE_ENV = "M2DIFF_COMPOSE_CACHE"


def compose_key(overrides: Sequence[str]) -> str:
    """sha256 of the overrides, every conf/ file (path and bytes) and the library versions."""
    import hydra
    import omegaconf

    root = conf_dir()
    digest = hashlib.sha256(json.dumps([list(map(str, overrides)), hydra.__version__,
                                        omegaconf.__version__]).encode())
    for file in sorted(root.rglob("*.yaml")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _compose(overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad setting in {list(overrides)}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    return cfg


def resolve_path(value: str | os.PathLike | None) -> Path | None:
    """Absolute path of a config value (relative to the current directory), or None."""
    if value is None or str(value) == "":
        return None
    return Path(os.path.expanduser(str(value))).resolve()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
