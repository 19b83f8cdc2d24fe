"""``m2diff simulate -m`` / ``m2diff bench`` end to end on the tiny sites: a real federation on
Flower's simulation engine beside centralised and local training, the summary, resuming."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

# The regression baseline learns in a few steps; 1 round of 2 steps keeps it CI-sized.
SMALL = ["model=unet", "fl.rounds=1", "train.steps=2", "train.batch_size=4", "sample.steps=2",
         "device=cpu", "fl.min_sites=3"]


def _data(sites) -> str:
    return "data.path=[" + ",".join(str(p) for p in sites) + "]"


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_sweep_federated_centralised_local_then_resume(tmp_path, tiny_sites, capsys):
    from m2diff.cli import main

    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "m2diff.cli", "simulate", "-m", _data(tiny_sites),
                           f"out={out}", *SMALL], capture_output=True, text=True, timeout=420,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 setting(s), 3 run(s), 0 already done" in proc.stdout
    runs = {p.name.split("_")[0]: p for p in (out / "runs").iterdir()}
    assert sorted(runs) == ["centralized", "federated", "local"]
    for mode, folder in runs.items():
        result = json.loads((folder / "run.json").read_text())
        assert result["status"] == "done" and result["mode"] == mode
        assert "model:\n  arch: unet" in (folder / "config.yaml").read_text()  # resolved config
        assert {r["site"] for r in result["rows"]} == {p.name for p in tiny_sites}
    assert (runs["federated"] / "checkpoint.pt").is_file()  # the Flower app's global model
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for site in tiny_sites:
        mine = [r for r in rows if r["site"] == site.name and r["cohort"] == "ALL"]
        assert [r["method"] for r in mine] == ["LD input", "federated", "centralized", "local"]
        assert all(float(r["psnr"]) > 0 for r in mine)
    with open(out / "answers.csv", newline="") as fh:
        (answer,) = list(csv.DictReader(fh))
    assert answer["fed_minus_central"] and answer["fed_minus_local_smallest"]
    assert (out / "summary.png").stat().st_size > 10_000
    assert "fed - central dB" in proc.stdout and "LD input dB" in (out / "summary.md").read_text()

    # A second sweep sharing two runs with the first: those are not trained again.
    capsys.readouterr()
    assert main(["bench", _data(tiny_sites), f"out={out}", *SMALL, "fl.mode=centralized,local",
                 "train.lr=0.001,0.002"]) == 0
    printed = capsys.readouterr().out
    assert "2 setting(s), 4 run(s), 2 already done" in printed
    assert printed.count("done before, skipped") == 2
    assert len(list((out / "runs").iterdir())) == 5


def test_bench_failed_run_is_reported_and_retried(tmp_path, capsys):
    from m2diff.cli import main

    empty = tmp_path / "empty-site"
    empty.mkdir()
    (empty / "participants.tsv").write_text("participant_id\tdiagnosis\n")
    words = ["bench", f"out={tmp_path / 'b'}", "fl.mode=local", *SMALL]
    assert main([*words, f"data.path=[{empty}]"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: no held-out rows" in printed and "0/1 run(s) done, 1 failed" in printed
    (folder,) = (tmp_path / "b" / "runs").iterdir()
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"
    assert (tmp_path / "b" / "summary.md").is_file()  # the summary still covers what ran
    # run again: the failed run is not taken as done
    assert main([*words, f"data.path=[{empty}]", "plan=true"]) == 0
    assert "to run" in capsys.readouterr().out
