"""Shared fixtures: a tiny simulated federation written once per test session as real NIfTI."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2diff.config import compose


@pytest.fixture(scope="session")
def tiny_cfg():
    """The composed config with the tiny model and the tiny generator preset."""
    return compose(["model=tiny", "generate=tiny"])


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory, tiny_cfg) -> list[Path]:
    """Three tiny generated sites (healthy-only, AD-heavy, mixed), 4 subjects each.

    Read-only for tests: copy a site before breaking it.
    """
    from m2diff.data.simulate.cohort import generate_sites

    out = tmp_path_factory.mktemp("sites")
    return generate_sites(tiny_cfg.generate, out, seed=0, progress=False)
