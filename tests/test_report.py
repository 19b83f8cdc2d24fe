"""Report writers and figures: files are written atomically and are non-empty."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from rich.console import Console

from m2diff import report


def test_plot_rounds_writes_png(tmp_path):
    rows = []
    for rnd in (1, 2, 3):
        for site in ("site-a", "site-b"):
            rows.append({"round": rnd, "site": site, "cohort": "CN", "n": 2,
                         "psnr": 20.0 + rnd, "ssim": 0.7 + 0.05 * rnd})
            # site-a has no AD subject: n = 0 placeholders are not plotted
            rows.append({"round": rnd, "site": site, "cohort": "AD", "n": 0 if site == "site-a" else 1,
                         "psnr": 0.0 if site == "site-a" else 19.0 + rnd,
                         "ssim": 0.0 if site == "site-a" else 0.6 + 0.05 * rnd})
    png = report.plot_rounds(rows, tmp_path / "rounds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
    # Refreshing overwrites in place; no temporary files are left behind.
    report.plot_rounds(rows[:4], png)
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.png"]


def test_plot_rounds_empty_rows(tmp_path):
    assert report.plot_rounds([], tmp_path / "r.png").stat().st_size > 0


def test_panel_png(tmp_path):
    rng = np.random.default_rng(0)
    cases = [{"label": f"sub-00{i}", "t1": rng.random((16, 16)), "ld": rng.random((16, 16)),
              "pred": rng.random((16, 16)), "sd": rng.random((16, 16))} for i in range(3)]
    cases[1]["t1"] = None  # MRI-free subject: an empty tile
    png = report.plot_panel(cases, tmp_path / "panel.png", title="CN")
    assert png.stat().st_size > 1000
    no_pred = [{**c, "pred": None} for c in cases]
    assert report.plot_panel(no_pred, tmp_path / "data.png").stat().st_size > 1000


def test_csv_json_and_tables(tmp_path):
    rows = [{"method": "LD input", "psnr": 20.0, "ssim": 0.8, "nmse": 0.1, "suvr_bias_pct": -3.0},
            {"method": "m2diff", "psnr": math.inf, "ssim": float("nan"), "extra": np.float32(1.5)}]
    path = report.write_csv(tmp_path / "a.csv", rows)
    read = list(csv.DictReader(path.open()))
    assert read[0]["method"] == "LD input" and read[1]["extra"] == "1.5"
    data = json.loads(report.write_json(tmp_path / "a.json", {"rows": rows}).read_text())
    assert data["rows"][1]["psnr"] is None and data["rows"][1]["extra"] == 1.5
    console = Console(record=True, width=120)
    report.print_table(rows, "t", ["method", "psnr", "ssim", "suvr_bias_pct"], console=console)
    text = console.export_text()
    assert "LD input" in text and "20.00" in text and "-3.00" in text
    md = report.markdown_table([{"method": "x", "psnr": 20.0, "psnr_std": 1.0}], ["method", "psnr"])
    assert "20.00 ± 1.00" in md and md.startswith("| method | PSNR dB |")


def test_privacy_spent_gets_a_panel_and_a_table_column(tmp_path):
    from matplotlib.image import imread

    from m2diff.fedutil import format_site_table, metric_rows

    plain, private = [], []
    for rnd in (1, 2, 3):
        for site, eps in (("site-a", 0.5), ("site-b", 0.8)):
            metrics = {"cn_n": 2, "cn_psnr": 20.0 + rnd, "cn_ssim": 0.8, "cn_ld_psnr": 19.0}
            plain += metric_rows(rnd, site, metrics, {"loss": 0.3})
            private += metric_rows(rnd, site, metrics, {"loss": 0.3, "dp_epsilon": eps * rnd})
    assert private[0]["train_dp_epsilon"] == 0.5
    without = imread(report.plot_rounds(plain, tmp_path / "plain.png"))
    with_eps = imread(report.plot_rounds(private, tmp_path / "private.png"))
    assert with_eps.shape[1] > 1.3 * without.shape[1]  # a third panel: epsilon per round
    table = format_site_table([r for r in private if r["round"] == 3])
    assert "epsilon" in table.splitlines()[0] and "| 2.4 |" in table  # site-b: 0.8 x 3
    assert "epsilon" not in format_site_table([r for r in plain if r["round"] == 3])
