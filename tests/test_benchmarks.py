"""The benchmark scripts run end to end at a toy budget (their tables are the README's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TOY = ["generate.sites=1", "generate.subjects=3", "generate.shape=[32,32,8]",
       "generate.angles=32", "generate.mlem_iters=4", "train.steps=2", "train.batch_size=4",
       "sample.steps=2"]


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_and_sampling_benchmarks_print_their_tables(tmp_path, capsys):
    quality = _load("quality")
    sites, out = tmp_path / "sites", tmp_path / "out"
    assert quality.main([*TOY, f"sites_dir={sites}", f"out={out}",
                         "methods=unet,m2diff,m2diff_residual"]) == 0
    text = (out / "quality.md").read_text()
    for method in ("LD input", "unet", "m2diff", "m2diff_residual"):
        assert f"| {method} |" in text
    assert "PSNR" in text and "SUVR" in text

    sampling = _load("sampling")
    assert sampling.main([*TOY, f"sites_dir={sites}", f"out={out}", "ddpm=false",
                          "ddim=2,4"]) == 0
    printed = capsys.readouterr().out
    assert "DDIM 2" in printed and "DDIM 4" in printed
