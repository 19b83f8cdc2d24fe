"""A real deployment on 127.0.0.1: one SuperLink with TLS, SuperNodes per site, our app.

One test walks through the lifecycle so the processes and torch imports are paid once:
1. two sites, one round: checkpoint (round 1) and per-site, per-cohort metric rows;
2. resume (round 2 follows round 1) with a third site whose ClientApp poisons its update
   with NaN (rejected; the global model stays finite) while hospital-b's SuperNode is killed
   as the round starts (fl.min_sites=1): the run still completes with the survivors. The
   kill costs the SuperLink's heartbeat timeout (~40-70 s).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from server.flwrctl import stop_group
from tests.flower_procs import REPO, LocalFederation, ProcessSet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = "model=tiny train.steps=2 train.batch_size=4 sample.steps=2 device=cpu"


def _run(fed: LocalFederation, out, overrides: str, timeout: float = 300) -> dict:
    run_id = fed.ctl.submit(REPO, {"out-dir": str(out), "overrides": overrides})
    row = fed.ctl.wait(run_id, timeout=timeout, stream=False)
    return row


def _rows(out) -> list[dict]:
    return json.loads((out / "rounds.json").read_text())


def _checkpoint(out) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_rounds_resume_poison_and_dropout(tmp_path, tiny_sites):
    out = tmp_path / "out"
    timings = {}
    with ProcessSet(tmp_path / "procs") as procs:
        fed = LocalFederation.start(procs)
        fed.supernode("site-a", {"data-path": str(tiny_sites[0]), "site-name": "hospital-a"})
        fed.supernode("site-b", {"data-path": str(tiny_sites[1]), "site-name": "hospital-b"})

        t0 = time.monotonic()
        row = _run(fed, out, f"{BASE} fl.rounds=1 fl.min_sites=2")
        timings["run1_s"] = time.monotonic() - t0
        assert row["status"] == "finished:completed", (row, procs.log("superlink")[-3000:])
        assert _checkpoint(out)["extra"]["round"] == 1
        rows = _rows(out)
        assert {(r["site"], r["cohort"]) for r in rows} >= {("hospital-a", "CN"), ("hospital-b", "AD")}
        assert all(r["round"] == 1 for r in rows)
        assert (out / "rounds.csv").is_file()
        timings["traffic_run1_bytes"] = row["network-traffic"]["total-bytes"]

        # 2. resume with a third, poisoned site; kill hospital-b's SuperNode as round 2 starts
        fed.supernode("site-c", {"data-path": str(tiny_sites[2]), "site-name": "hospital-c",
                                 "test-fault": "nan"})
        victim = procs.procs[2]  # hospital-b's SuperNode
        run_id = fed.ctl.submit(REPO, {"out-dir": str(out),
                                       "overrides": f"{BASE} fl.rounds=2 fl.min_sites=1"})
        time.sleep(5)
        stop_group(victim, grace_s=0.1)
        t0 = time.monotonic()
        row = fed.ctl.wait(run_id, timeout=300, stream=False)
        timings["run2_after_kill_s"] = time.monotonic() - t0
        assert row["status"] == "finished:completed", (row, procs.log("superlink")[-3000:])
        ckpt = _checkpoint(out)
        assert ckpt["extra"]["round"] == 2
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        rows = _rows(out)
        assert sorted({r["round"] for r in rows}) == [1, 2]
        round2 = [r for r in rows if r["round"] == 2]
        # hospital-b dropped out; hospital-c is evaluated but its NaN update was rejected
        assert {r["site"] for r in round2} == {"hospital-a", "hospital-c"}
        assert all("train_loss" in r for r in round2 if r["site"] == "hospital-a")
        assert all("train_loss" not in r for r in round2 if r["site"] == "hospital-c")
    print("deployment timings:", json.dumps(timings))
