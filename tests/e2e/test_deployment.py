"""A real deployment on 127.0.0.1: one SuperLink with TLS, SuperNodes per site, our app.

One test walks through the lifecycle so the processes and torch imports are paid once:
1. two sites, one round: checkpoint (round 1) and per-site, per-cohort metric rows.
   hospital-a runs the real ``m2diff-client`` pinned to the hash ``m2diff-client fab-hash``
   computes for this repository (SuperNode in process isolation, m2diff-superexec,
   m2diff-clientapp): that it trains proves the hash equals the one the SuperNode gets from
   ``flwr run`` of the same tree; hospital-b is a plain flower-supernode;
2. the attack of issue 12: a hostile app (tests/e2e/hostile_app) whose ClientApp sends back a
   site's participants.tsv, file list and environment names is run on the federation. The
   plain SuperNode runs it and leaks; the pinned site refuses it before any of its code runs
   (error reply ``site-app-not-allowed``, no marker file, its log names the hash);
3. resume (round 2 follows round 1) with a third site whose ClientApp poisons its update
   with NaN (rejected; the global model stays finite) while hospital-b's SuperNode is killed
   as the round starts (fl.min_sites=1): the run still completes with the survivors. The
   kill costs the SuperLink's heartbeat timeout (~40-70 s).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from client.app_pinning import app_hash
from server.flwrctl import stop_group, tool
from tests.flower_procs import REPO, LocalFederation, ProcessSet, free_port

HOSTILE = REPO / "tests" / "e2e" / "hostile_app"

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
    ours = app_hash(REPO)  # what `m2diff-client fab-hash` prints for this tree
    logs = tmp_path / "hospital-a-logs"
    with ProcessSet(tmp_path / "procs") as procs:
        fed = LocalFederation.start(procs)
        procs.start("site-a", [
            tool("m2diff-client"), f"superlink=127.0.0.1:{fed.port}",
            f"root-certificates={fed.certs.ca}", f"data={tiny_sites[0]}", "site=hospital-a",
            f"port={free_port()}", "threads=1", f"allow-fab=sha256:{ours}", f"log-dir={logs}",
            f"state-dir={tmp_path / 'hospital-a-state'}"], fed.ctl.env)
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
        assert all("train_loss" in r for r in rows if r["site"] == "hospital-a")
        site_log = "".join(p.read_text() for p in logs.glob("supernode.log*"))
        assert f"app sha256 {ours} of run" in site_log and "is allowed" in site_log

        # 2. a hostile app: the plain SuperNode runs it, the pinned site refuses it
        markers, loot = tmp_path / "markers", tmp_path / "loot"
        markers.mkdir()
        t0 = time.monotonic()
        hostile_id = fed.ctl.submit(HOSTILE, {"out-dir": str(loot), "marker-dir": str(markers)})
        row = fed.ctl.wait(hostile_id, timeout=300, stream=False)
        timings["hostile_run_s"] = time.monotonic() - t0
        assert row["status"] == "finished:completed", (row, procs.log("superlink")[-3000:])
        answers = json.loads((loot / "replies.json").read_text())["answers"]
        assert len(answers) == 2, answers
        leaked = [a for a in answers.values() if "participants" in a]
        refused = [a for a in answers.values() if "error" in a]
        assert len(leaked) == 1 and "participant_id" in leaked[0]["participants"]  # the attack is real
        assert refused == [{"error": "site-app-not-allowed", "code": 7}]  # Flower's INVALID_FAB
        assert sorted(p.name for p in markers.iterdir()) == ["ran-at-hospital-b"]
        site_log = "".join(p.read_text() for p in logs.glob("supernode.log*"))
        assert f"refusing run {hostile_id}: its app (sha256 {app_hash(HOSTILE)}" in site_log

        # 3. resume with a third, poisoned site; kill hospital-b's SuperNode as round 2 starts
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
