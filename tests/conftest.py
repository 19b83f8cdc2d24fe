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
    from m2diff.data.generate.cohort import generate_sites

    out = tmp_path_factory.mktemp("sites")
    return generate_sites(tiny_cfg.generate, out, seed=0, progress=False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op torch thread per test: on a shared 2-core machine the default two OpenMP
    threads spin against the other processes (SuperNodes, Ray workers) and make the tiny
    model's small ops several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
