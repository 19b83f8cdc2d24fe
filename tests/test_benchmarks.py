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


@pytest.mark.slow
def test_privacy_benchmark_smoke_prints_timing_and_utility_tables(tmp_path, capsys):
    privacy = _load("privacy")
    out = tmp_path / "out"
    assert privacy.main(["smoke=true", f"sites_dir={tmp_path / 'sites'}", f"out={out}"]) == 0
    text = (out / "privacy.md").read_text()
    for row in ("| m2diff | no DP | 1 |", "| m2diff | Opacus hooks | 1 |",
                "| m2diff | torch.func | 4 |", "| unet | Opacus hooks | 1 |"):
        assert row in text
    for method in ("LD input", "m2diff, no DP", "m2diff, ε=3", "m2diff, ε=3, K=4",
                   "unet (regression), no DP", "unet (regression), ε=3"):
        assert f"| {method} |" in text
    assert "PSNR" in text and "ε spent" in text
    spent = [row["ε spent"] for row in privacy_rows(out) if row["method"].endswith("ε=3")]
    assert spent and all(2.5 < e <= 3.0 + 1e-6 for e in spent)
    assert "Time per training step" in capsys.readouterr().out


def privacy_rows(out: Path) -> list[dict]:
    import json

    tables = json.loads((out / "privacy.json").read_text())["tables"]
    return [row for rows in tables.values() for row in rows]
