"""The benchmark scripts run end to end at a toy budget (their tables are the README's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TOY = ["generate.sites=1", "generate.subjects=3", "generate.shape=[32,32,8]",
       "generate.angles=32", "generate.mlem_iters=4", "train.steps=2", "train.batch_size=4"]


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses with string annotations look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_and_sampling_benchmarks_print_their_tables(tmp_path, capsys):
    quality = _load("quality")
    sites, out = tmp_path / "sites", tmp_path / "out"
    assert quality.main([*TOY, f"sites_dir={sites}", f"out={out}", "test_per_group=1",
                         "methods=unet,m2diff,m2diff_paper,m2diff_mri_free"]) == 0
    participants = (sites / "site-a-healthy" / "participants.tsv").read_text().split()
    assert participants.count("test") == 1 and participants.count("train") == 2
    text = (out / "quality.md").read_text()
    for method in ("LD input", "unet", "m2diff", "m2diff_paper", "m2diff_mri_free"):
        assert f"| {method} |" in text
    assert "| site-a-healthy | CN | m2diff |" in text  # the per site x cohort table
    assert "PSNR" in text and "SUVR" in text and "precuneus %" in text
    assert "m2diff >= LD input, site-a-healthy CN" in text  # the goal lines

    sampling = _load("sampling")
    assert sampling.main([*TOY, f"sites_dir={sites}", f"out={out}", "ddpm=false",
                          "ddim=1,2"]) == 0
    printed = capsys.readouterr().out
    assert "DDIM" in printed and "fewest DDIM steps within 0.2 dB" in printed
    rows = [{"sampler": "DDPM", "steps": 1000, "psnr": 30.0},
            {"sampler": "DDIM", "steps": 1, "psnr": 29.7},
            {"sampler": "DDIM", "steps": 4, "psnr": 29.85}, {"sampler": "DDIM", "steps": 25, "psnr": 29.95}]
    assert sampling.recommended_steps(rows) == 4


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
