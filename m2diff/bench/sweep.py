"""Sweep words -> the bench's runs, with Hydra's own multirun semantics.

``key=a,b`` (or ``range(...)``, ``choice(...)``) sweeps a key; the runs are the cartesian
product, in the order the words were given (Hydra's BasicSweeper). ``fl.mode`` is swept over
``federated,centralized,local`` when the words do not choose it, and ``fl.mode=all`` means
those three. Every run composes the full config (m2diff.config.compose), so ``model=unet``,
``privacy=dp`` or ``generate=realistic_tiny`` mean what they mean in every other command.

Identity: a run is its resolved config minus what does not change its result (the output
folder, where it runs, how many loader workers). Centralised and local training never run a
federation, so for them the federation-only settings (strategy and its parameters, secure
aggregation, client-level DP) are set back to their defaults before the identity is taken:
``fl.strategy=fedavg,fedprox`` shares one centralised and one local run between both
settings instead of training them twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from m2diff.config import ConfigError, compose

MODES = ("federated", "centralized", "local")
DEFAULTS = {"generate": "tiny", "train.steps": "60"}  # the CPU bench's, unless the words say
# Settings that change where or how fast a run goes, not its result.
VOLATILE = ("out", "fl.resume", "fl.round_timeout", "fl.num_cpus", "fl.num_gpus",
            "fl.ray_address", "data.cache_dir", "generate.out", "generate.workers",
            "train.num_workers", "train.checkpoint_every")
# What centralised / local training reads of ``fl``; the rest only matters to a federation.
NON_FEDERATED_FL = ("rounds", "sites", "mode")


@dataclass(frozen=True)
class Run:
    """One training run: its override words, composed config, identity and folder name."""

    words: tuple[str, ...]  # Hydra overrides that compose ``cfg`` (base words first)
    swept: tuple[str, ...]  # the swept words of this run, fl.mode included
    cfg: DictConfig = field(compare=False, hash=False, repr=False)
    identity: str = ""  # 12 hex digits of sha256 of the result-relevant config
    name: str = ""  # folder name: readable swept words + identity

    @property
    def mode(self) -> str:
        return str(self.cfg.fl.mode)


@dataclass(frozen=True)
class Setting:
    """One combination of the swept keys other than ``fl.mode``: a row group of the summary."""

    label: str  # e.g. "fl.strategy=fedprox privacy=dp", or "base" without swept keys
    runs: dict[str, Run]  # mode -> run


def parse(words: Sequence[str]) -> list[Any]:
    """Hydra ``Override`` objects of the words (raises ConfigError naming the bad word)."""
    try:
        return OverridesParser.create().parse_overrides(list(words))
    except HydraException as exc:
        raise ConfigError(f"bad sweep word in {list(words)}: {exc}") from None


def expand(words: Sequence[str]) -> tuple[list[list[str]], set[str]]:
    """The cartesian product of the sweep (BasicSweeper.split_arguments), and the swept keys."""
    overrides = parse(words)
    for o in overrides:
        if o.is_sweep_override() and o.key_or_group == "out":
            raise ConfigError("out is the bench's folder; it cannot be swept")
    swept = {o.key_or_group for o in overrides if o.is_sweep_override()}
    try:
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
    except HydraException as exc:
        raise ConfigError(f"cannot sweep {list(words)}: {exc}") from None
    return [list(job) for job in jobs], swept


def _key(word: str) -> str:
    return parse([word])[0].key_or_group


def with_defaults(words: Sequence[str]) -> list[str]:
    """The bench's defaults (tiny generator preset, 60 steps per round, fl.mode over all
    three) ahead of the words, for keys the words do not set."""
    given = {_key(w) for w in words}
    base = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given]
    if "fl.mode" not in given:
        base.append("fl.mode=" + ",".join(MODES))
    return base + list(words)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p) or {}
    if isinstance(tree, dict):
        tree.pop(leaf, None)


def identity_of(cfg: DictConfig) -> str:
    """12 hex digits naming the run's result (see the module doc)."""
    tree = _plain(cfg)
    for key in VOLATILE:
        _drop(tree, key)
    for section in ("export", "prepare") + (("generate",) if cfg.data.get("path") else ()):
        tree.pop(section, None)  # not read by training (the generator only without data.path)
    if str(cfg.fl.mode) != "federated":
        tree["fl"] = {k: v for k, v in tree["fl"].items() if k in NON_FEDERATED_FL}
        if str(cfg.privacy.get("kind", "none")) != "dp":
            tree["privacy"] = {"kind": "none"}  # client-level DP is a federation's setting
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(words: Sequence[str]) -> str:
    text = "_".join(words) or "base"
    text = re.sub(r"[^A-Za-z0-9_=.,+-]+", "-", text).strip("-")
    return text[:80]


def _relevant(word: str, mode: str) -> bool:
    """Does a swept word change a run of this mode (see NON_FEDERATED_FL)?"""
    key = _key(word)
    if mode == "federated":
        return True
    if key.startswith("fl."):
        return key.split(".")[1] in NON_FEDERATED_FL
    return True


def plan(words: Sequence[str]) -> list[Setting]:
    """The settings of a sweep, each with its runs per mode; identical runs are shared.

    Raises ConfigError for a word Hydra cannot parse or compose, or an unknown ``fl.mode``.
    """
    jobs, swept = expand(with_defaults(words))
    runs: dict[str, Run] = {}
    settings: dict[str, dict[str, Run]] = {}
    for job in jobs:
        mode_words = [w for w in job if _key(w) == "fl.mode"]
        mode = mode_words[-1].split("=", 1)[1] if mode_words else "federated"
        modes = MODES if mode == "all" else (mode,)
        if any(m not in MODES for m in modes):
            raise ConfigError(f"fl.mode={mode}: choose federated, centralized, local or all")
        label_words = [w for w in job if _key(w) in swept and _key(w) != "fl.mode"]
        label = " ".join(label_words) or "base"
        for m in modes:
            run_words = [w for w in job if _key(w) != "fl.mode"] + [f"fl.mode={m}"]
            cfg = compose(run_words)
            ident = identity_of(cfg)
            if ident not in runs:
                shown = [w for w in label_words if _relevant(w, m)]
                runs[ident] = Run(tuple(run_words), tuple(shown + [f"fl.mode={m}"]), cfg, ident,
                                  f"{_slug([m, *shown])}_{ident}")
            settings.setdefault(label, {})[m] = runs[ident]
    return [Setting(label, by_mode) for label, by_mode in settings.items()]


def unique_runs(settings: Sequence[Setting]) -> list[Run]:
    """Every run once, in plan order."""
    seen: dict[str, Run] = {}
    for s in settings:
        for run in s.runs.values():
            seen.setdefault(run.identity, run)
    return list(seen.values())
