"""One small raw export (generated, DICOM and NIfTI subjects) and its prepared site, made
once per test session and shared read-only: copy before changing either."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m2diff.config import compose

SUBJECTS = 4  # sub-001 and sub-003 as DICOM series, sub-002 and sub-004 as NIfTI


@pytest.fixture(scope="session")
def prepare_cfg():
    """Composed config of a raw_tiny export: one site (site-a-healthy, 1/4 dose)."""
    return compose(["export=raw_tiny", "generate=tiny", "generate.sites=1",
                    f"generate.subjects={SUBJECTS}"])


@pytest.fixture(scope="session")
def raw_export(tmp_path_factory, prepare_cfg) -> Path:
    """The export folder (``<root>/site-a-healthy``); ``<root>/truth/site-a-healthy.json``
    holds each subject's known PET -> T1 pose."""
    from m2diff.data.generate.export_raw import generate_exports

    root = tmp_path_factory.mktemp("raw")
    [site] = generate_exports(prepare_cfg.generate, prepare_cfg.export, root, seed=0)
    return site


def truth(export: Path) -> dict[str, np.ndarray]:
    """Subject id -> (4, 4) RAS PET -> T1 transform the export was made with."""
    data = json.loads((export.parent / "truth" / f"{export.name}.json").read_text())
    return {sid: np.asarray(v["pet_to_t1_ras"]) for sid, v in data.items()}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, raw_export, prepare_cfg):
    """(site folder, SiteResult) of ``m2diff prepare`` on the raw export."""
    from omegaconf import OmegaConf

    from m2diff.prepare.pipeline import prepare_site

    out = tmp_path_factory.mktemp("prepared") / "site-a"
    result = prepare_site(raw_export, out, None, OmegaConf.to_container(prepare_cfg.prepare))
    return out, result
