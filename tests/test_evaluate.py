"""Evaluation: summary and federated site metrics, and the `m2diff evaluate` command."""

from __future__ import annotations

import csv
import json
import math

import pytest

from m2diff.evaluate import LD_METHOD, site_metrics, summarise


def _rows(site: str, diagnoses: list[str]) -> list[dict]:
    rows = []
    for i, dx in enumerate(diagnoses):
        base = {"site": site, "subject": f"sub-{i:03d}", "diagnosis": dx}
        rows.append({**base, "method": LD_METHOD, "psnr": 20.0 + i, "ssim": 0.8, "nmse": 0.1,
                     "suvr_bias_pct": -2.0})
        rows.append({**base, "method": "m2diff", "psnr": 25.0 + i, "ssim": 0.9, "nmse": 0.05,
                     "suvr_bias_pct": -1.0})
    return rows


def test_site_metrics_identical_keys_without_ad():
    healthy = site_metrics(_rows("a", ["CN", "CN"]), "m2diff")
    mixed = site_metrics(_rows("b", ["CN", "AD", "AD"]), "m2diff")
    assert list(healthy) == list(mixed)
    assert healthy["ad_n"] == 0 and healthy["ad_psnr"] == 0.0 and healthy["ld_ad_ssim"] == 0.0
    assert healthy["cn_n"] == 2 and healthy["cn_psnr"] == pytest.approx(25.5)
    assert healthy["ld_cn_psnr"] == pytest.approx(20.5)
    assert mixed["ad_psnr"] == pytest.approx(26.5) and mixed["all_n"] == 3
    assert {"cn_ssim", "cn_nmse", "cn_suvr_bias", "all_psnr", "ld_all_nmse"} <= set(mixed)
    assert all(isinstance(v, float) and math.isfinite(v) for v in mixed.values())
    assert site_metrics(_rows("a", ["CN"])) == site_metrics(_rows("a", ["CN"]), "m2diff")


def test_summarise_groups():
    rows = _rows("a", ["CN", "CN"]) + _rows("b", ["CN", "AD"])
    summary = summarise(rows)
    keys = {(s["method"], s["site"], s["cohort"]) for s in summary}
    assert ("m2diff", "a", "AD") not in keys  # empty group left out
    assert {("LD input", "pooled", "CN"), ("m2diff", "pooled", "all"), ("m2diff", "b", "AD")} <= keys
    pooled_cn = next(s for s in summary if s["method"] == "m2diff" and s["site"] == "pooled"
                     and s["cohort"] == "CN")
    assert pooled_cn["n"] == 3 and pooled_cn["psnr"] == pytest.approx(25 + 1 / 3)
    assert pooled_cn["psnr_std"] == pytest.approx(0.57735, rel=1e-4)
    assert summary[0]["method"] == LD_METHOD
    assert set(summary[0]) == set(summary[-1])


def test_evaluate_command_ld_only(request, tmp_path):
    pytest.importorskip("m2diff.data.generate.cohort")
    tiny_sites = request.getfixturevalue("tiny_sites")
    from m2diff.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", f"data={tiny_sites[2]}", f"out={out}", "split=all"]) == 0
    rows = list(csv.DictReader((out / "metrics_subjects.csv").open()))
    assert rows and rows[0]["method"] == LD_METHOD
    assert float(rows[0]["psnr"]) > 0
    data = json.loads((out / "metrics.json").read_text())
    assert "cerebellum" in data["protocol"] and data["summary"]
    assert (out / "metrics_summary.csv").stat().st_size > 0
    assert any(p.stat().st_size > 1000 for p in out.glob("panel_*.png"))
    assert (out / "panel.png").stat().st_size > 1000  # first CN + first AD subject


def test_evaluate_command_with_checkpoint(request, tmp_path):
    """A (untrained) unet checkpoint: its row follows the LD input row of each subject, and
    a site's flat metrics have the federated keys."""
    pytest.importorskip("m2diff.data.generate.cohort")
    checkpoint = pytest.importorskip("m2diff.checkpoint")
    tiny_sites = request.getfixturevalue("tiny_sites")
    from m2diff.cli import main
    from m2diff.config import compose
    from m2diff.model import build_model

    cfg = compose(["model=unet"])
    ckpt = checkpoint.save_checkpoint(tmp_path / "unet.pt", build_model(cfg.model), cfg)
    out = tmp_path / "eval"
    assert main(["evaluate", f"data={tiny_sites[1]}", f"out={out}", f"checkpoint={ckpt}",
                 "device=cpu"]) == 0
    rows = list(csv.DictReader((out / "metrics_subjects.csv").open()))
    assert [r["method"] for r in rows[:2]] == [LD_METHOD, "unet"]
    assert rows[0]["subject"] == rows[1]["subject"]
    flat = site_metrics([{**r, **{k: float(r[k]) for k in ("psnr", "ssim", "nmse", "suvr_bias_pct")}}
                         for r in rows])
    assert flat["all_n"] == len(rows) // 2 and math.isfinite(flat["all_psnr"])
