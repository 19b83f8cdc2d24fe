"""The coordinator's settings on their way to the apps, one function each way.

One config tree (conf/) travels as the run config's ``overrides`` value: Hydra override
words joined by spaces (``"model=tiny fl.rounds=5"``), which Flower carries as a TOML string
(``m2diff.ops.flower.toml_pairs``). Out: ``run_overrides(cfg)`` (the words that turn the
default config into ``cfg``; what ``m2diff simulate`` sends) or the command's own words
(``m2diff-server``), then ``overrides_text(words)``. In: ``m2diff.fedutil.compose_run_config``
(the ServerApp) and ``client.site_policy.site_config`` (a site, after its policy), both
splitting with ``m2diff.fedutil.split_overrides``. tests/test_runconfig.py holds the round
trip, through Flower's own parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from m2diff.config import ConfigError, compose
from m2diff.fedutil import split_overrides

SKIP = ("generate", "data.path", "out")  # not needed by the ServerApp / ClientApps


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[\w./:+@-]+", text) else json.dumps(text)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def run_overrides(cfg: DictConfig) -> list[str]:
    """Hydra overrides (``++key=value``) that turn the default config into ``cfg``: what the
    ServerApp and every ClientApp compose (generation settings and site paths left out)."""
    def plain(c: DictConfig | ListConfig) -> Any:
        return OmegaConf.to_container(c, resolve=True)

    base = _leaves(plain(compose([])))
    words = []
    for key, value in _leaves(plain(cfg)).items():
        if any(key == s or key.startswith(s + ".") for s in SKIP):
            continue
        if key not in base or base[key] != value:
            words.append(f"++{key}={_hydra_value(value)}")
    return words


def overrides_text(words: Sequence[str]) -> str:
    """The run config's ``overrides`` value for ``words``; ConfigError for a word the apps
    would not get back whole (a space outside double quotes)."""
    text = " ".join(words)
    if split_overrides(text) != list(words):
        bad = [w for w in words if split_overrides(w) != [w]]
        raise ConfigError(f"cannot pass {bad or list(words)} to the apps: a value with spaces "
                          'needs double quotes (key="a b")')
    return text
