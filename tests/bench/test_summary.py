"""The bench's summary and answers from known rows: pooling, the smallest site, thresholds."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from m2diff.bench.figure import plot_bench
from m2diff.bench.summary import answers, compare_rows, summary_rows, write_summary


def _rows(psnr: dict[str, float], ld: dict[str, float], n: dict[str, int], eps: float | None = None):
    rows = []
    for site, value in psnr.items():
        row = {"round": 1, "site": site, "cohort": "ALL", "n": n[site], "psnr": value,
               "ssim": 0.9, "nmse": 0.01, "suvr_bias": 1.0, "ld_psnr": ld[site], "ld_ssim": 0.8,
               "ld_nmse": 0.02, "ld_suvr_bias": 2.0}
        if eps is not None:
            row["train_dp_epsilon"] = eps
        rows.append(row)
        rows.append({**row, "cohort": "AD", "n": 0})  # a cohort the site lacks: left out
    return rows


LD = {"big": 20.0, "small": 18.0}
N = {"big": 3, "small": 1}
RESULTS = {
    "fed": {"status": "done", "wall_s": 30.0, "sites": {"big": 12, "small": 3},
            "rows": _rows({"big": 25.0, "small": 23.0}, LD, N, eps=4.5)},
    "cen": {"status": "done", "wall_s": 10.0, "sites": {"big": 12, "small": 3},
            "rows": _rows({"big": 25.2, "small": 23.0}, LD, N)},
    "loc": {"status": "done", "wall_s": 5.0, "sites": {"big": 12, "small": 3},
            "rows": _rows({"big": 24.0, "small": 21.5}, LD, N)},
    "bad": {"status": "failed", "rows": [], "error": "boom"},
}


def _setting(label, **modes):
    return SimpleNamespace(label=label, runs={m: SimpleNamespace(identity=i, name=f"{m}_{i}")
                                              for m, i in modes.items()})


def test_compare_rows_put_the_ld_input_first_once_per_site_and_cohort():
    table = compare_rows({"federated": RESULTS["fed"]["rows"], "local": RESULTS["loc"]["rows"]})
    assert [(r["site"], r["method"]) for r in table] == [
        ("big", "LD input"), ("big", "federated"), ("big", "local"),
        ("small", "LD input"), ("small", "federated"), ("small", "local")]
    assert table[1]["epsilon"] == 4.5 and "epsilon" not in table[2]


def test_answers_pool_by_subjects_and_compare_at_the_smallest_site(tmp_path):
    settings = [_setting("a", federated="fed", centralized="cen", local="loc"),
                _setting("b", federated="bad", centralized="cen", local="loc")]
    rows = summary_rows(settings, RESULTS)
    assert {r["method"] for r in rows if r["setting"] == "b"} == {"LD input", "centralized", "local"}
    a, b = answers(rows)
    assert a["psnr_federated"] == pytest.approx((3 * 25.0 + 1 * 23.0) / 4)
    assert a["psnr_centralized"] == pytest.approx((3 * 25.2 + 23.0) / 4)
    assert a["fed_minus_central"] == pytest.approx(-0.15) and a["within_0.3dB"] is True
    assert a["smallest_sites"] == "small" and a["smallest_subjects"] == 3
    assert a["fed_minus_local_smallest"] == pytest.approx(1.5) and a["above_1dB"] is True
    assert a["epsilon"] == 4.5
    assert b["psnr_federated"] is None and b["within_0.3dB"] is None and b["above_1dB"] is None

    write_summary(tmp_path, rows, [a, b], "# test")
    with open(tmp_path / "summary.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows) and written[1]["method"] == "federated"
    assert written[1]["wall_s"] == "30.0" and written[1]["run"] == "federated_fed"
    md = (tmp_path / "summary.md").read_text()
    assert "| a | 19.50 | 24.50 | 24.65 | 23.38 | -0.15 | yes | small | 3 | +1.50 | yes | 4.50 |" in md
    png = plot_bench(rows, tmp_path / "summary.png")
    assert png.stat().st_size > 10_000 and not list(tmp_path.glob(".*tmp*"))


def test_a_federation_worse_than_the_thresholds_says_no():
    worse = {**RESULTS, "fed": {**RESULTS["fed"], "rows": _rows({"big": 24.0, "small": 22.0}, LD, N)}}
    (a,) = answers(summary_rows([_setting("a", federated="fed", centralized="cen", local="loc")], worse))
    assert a["within_0.3dB"] is False and a["fed_minus_local_smallest"] == pytest.approx(0.5)
    assert a["above_1dB"] is False and a["epsilon"] is None
