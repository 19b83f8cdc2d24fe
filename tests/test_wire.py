"""The keys both sides use (m2diff/wire.py) match the app's declared run config."""

from __future__ import annotations

import tomllib
from pathlib import Path

from m2diff import wire

REPO = Path(__file__).resolve().parents[1]


def test_run_config_keys_are_the_apps_declared_ones():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(wire.RUN_CONFIG_KEYS) == set(declared)


def test_every_key_is_spelled_once():
    values = [v for k, v in vars(wire).items() if k.endswith("_KEY") or k == "SITE_RECORD"]
    assert len(values) == len(set(values))
