"""``m2diff simulate`` at its smallest setting, and the app bundle Flower ships to sites."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from tests.flower_procs import REPO

SMALL = ["fl.rounds=1", "train.steps=2", "train.batch_size=4", "sample.steps=2", "device=cpu",
         "fl.min_sites=3"]


@pytest.mark.e2e
@pytest.mark.slow
def test_simulate_federated_smallest(tmp_path, tiny_sites):
    data = "data.path=[" + ",".join(str(p) for p in tiny_sites) + "]"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Ray gives each virtual site 1 thread too
    proc = subprocess.run([sys.executable, "-m", "m2diff.cli", "simulate", data,
                           f"out={tmp_path}", *SMALL], capture_output=True, text=True,
                          timeout=420, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "federated" / "rounds.json").read_text())
    assert {r["site"] for r in rows} == {p.name for p in tiny_sites}
    assert "federated" in proc.stdout and "LD input" in proc.stdout
    assert (tmp_path / "federated" / "checkpoint.pt").is_file()


@pytest.mark.e2e
@pytest.mark.slow
def test_simulate_all_modes_one_table(tmp_path, tiny_sites):
    """``fl.mode=all``: the federation (real Flower simulation), centralised and local training
    on the same sites and budget, one table with the LD input first per site and cohort.
    Asserts everything test_simulate_federated_smallest does, so that one can go."""
    data = "data.path=[" + ",".join(str(p) for p in tiny_sites) + "]"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "m2diff.cli", "simulate", data, "fl.mode=all",
                           f"out={tmp_path}", *SMALL], capture_output=True, text=True,
                          timeout=480, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "federated" / "rounds.json").read_text())
    assert {r["site"] for r in rows} == {p.name for p in tiny_sites}
    assert (tmp_path / "federated" / "checkpoint.pt").is_file()
    for mode in ("centralized", "local"):
        assert {r["site"] for r in json.loads((tmp_path / mode / "rows.json").read_text())} == \
            {p.name for p in tiny_sites}
    with open(tmp_path / "compare.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    for site in tiny_sites:
        methods = [r["method"] for r in table if r["site"] == site.name and r["cohort"] == "ALL"]
        assert methods == ["LD input", "federated", "centralized", "local"]
    assert "federated vs centralized vs local" in proc.stdout and "LD input" in proc.stdout


@pytest.fixture
def one_thread():
    """torch's default (all cores) oversubscribes 2 shared cores: ~10x slower here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_simulate_without_flower(tmp_path, tiny_sites, mode, capsys, one_thread):
    from m2diff.cli import main

    data = "data.path=[" + ",".join(str(p) for p in tiny_sites) + "]"
    assert main(["simulate", data, f"out={tmp_path}", f"fl.mode={mode}", *SMALL]) == 0
    rows = json.loads((tmp_path / mode / "rows.json").read_text())
    assert {r["site"] for r in rows} == {p.name for p in tiny_sites}
    assert mode in capsys.readouterr().out


def test_app_bundle_is_small_and_complete():
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10 * 2**20
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    for needed in ("client/app.py", "server/app.py", "m2diff/config.py", "conf/config.yaml"):
        assert needed in names
    assert not any(n.startswith((".venv/", "data/", "runs/")) or n.endswith((".pt", ".nii.gz"))
                   for n in names)


def test_simulate_local_and_centralised_with_sample_level_dp(tmp_path, tiny_sites, one_thread):
    """privacy=dp without a federation: DP-SGD too, and every row says what it cost."""
    from m2diff.cli import main

    data = "data.path=[" + ",".join(str(p) for p in tiny_sites) + "]"
    for mode in ("local", "centralized"):
        assert main(["simulate", data, f"out={tmp_path}", f"fl.mode={mode}", "model=unet",
                     "privacy=dp", "privacy.noise_multiplier=1.0", *SMALL]) == 0
        rows = json.loads((tmp_path / mode / "rows.json").read_text())
        spent = {r["site"]: r["train_dp_epsilon"] for r in rows}
        assert set(spent) == {p.name for p in tiny_sites}
        assert all(0 < eps < float("inf") for eps in spent.values())
    assert len(set(spent.values())) == 1  # centralised: one model, one epsilon for every site


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
@pytest.mark.slow
def test_simulate_stopped_with_sigterm_leaves_no_processes(tmp_path, tiny_sites):
    """A scheduler or a container stop sends SIGTERM: the simulation's SuperLink, Flower's
    SuperExec, the flwr-simulation process and Ray's processes end with it."""

    from m2diff.ops.procs import descendants

    data = "data.path=[" + ",".join(str(p) for p in tiny_sites) + "]"
    proc = subprocess.Popen([sys.executable, "-m", "m2diff.cli", "simulate", data,
                             f"out={tmp_path}", "fl.rounds=3", "train.steps=500", "device=cpu",
                             "fl.min_sites=3"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        family: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            family = descendants(proc.pid)
            if any("flwr-simulation" in _cmdline(p) for p in family):
                break
            time.sleep(1)
        assert any("flwr-simulation" in _cmdline(p) for p in family), "the simulation never started"
        time.sleep(5)  # Ray's processes under way
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
        time.sleep(2)
        left = {p: _cmdline(p)[:120] for p in family if _alive(p)}
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in family:  # what a failed run left: not for the next test to meet
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
