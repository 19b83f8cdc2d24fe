"""A real deployment on 127.0.0.1, as a coordinator and three hospitals run it: ``m2diff-server``
(TLS, SuperNode auth on by default, the SuperLink on loopback behind the nginx front) with
``m2diff-client`` sites and one bare ``flower-supernode`` whose ClientApp poisons its update.

One federation of three tiny sites and two rounds walks through everything, so the process
starts and torch imports are paid once (the loopback deployment and operations tests of
earlier versions, merged; about 5 minutes on 2 shared cores):
0. an outsider with only ca.crt at the public port: ``flwr ls``, ``flwr supernode list``,
   ``flwr supernode register``, ``flwr run`` of its own app, the runtime and Control routes
   (also with ``..`` tricks), /docs, and an oversized request all fail at the front; the
   coordinator's own flwr (loopback) still lists exactly its run and the three registered
   sites;
1. hospital-c's SuperNode (test-fault=nan) sends NaN weights: rejected every round, named in
   the log and its rows; the global model stays finite;
2. as round 1's training starts, hospital-b's m2diff-client is stopped (SIGTERM, like
   ``docker stop``) and started again with the same key: it rejoins with its node id and
   answers again;
3. round 1 done -> ``m2diff-server status`` lists the three sites online and the run at 1/2;
4. the front (nginx) is killed: m2diff-server starts it again, the sites reconnect;
5. the SuperLink is killed (SIGKILL): m2diff-server starts it again on the same state
   database, the sites reconnect with their node ids, and the lost run is submitted again,
   resuming after round 1 (the resume path);
6. hospital-c's SuperNode is killed hard once its round-2 update is in: round 2's evaluation
   waits for its heartbeat to lapse (~40-70 s) and the run completes with the survivors;
7. m2diff-server printed and recorded the app's FAB sha256 for both runs, equal to Flower's own
   build of the app folder and to what the pinned sites (``m2diff-client allow-fab=``, the hash
   ``m2diff-client fab-hash`` prints) accept; the log files (ours, the SuperLink's, the front's
   refusals, the ServerApp's, the SuperNode's) are there and rotated; a site's cache went to its
   cache-dir.

A second, short test runs the app-substitution attack: a hostile app submitted on the
coordinator's side runs on a plain SuperNode (and leaks) but is refused by a pinned site
before any of its code runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from client.app_pinning import app_hash
from m2diff.ops.flower import Federation, flower_env, toml_pairs, tool, write_connection
from m2diff.ops.procs import descendants
from tests.e2e.public_port import assert_refused, attack
from tests.flower_procs import REPO, LocalFederation, ProcessSet, free_port, make_certs, wait_port

HOSTILE = REPO / "tests" / "e2e" / "hostile_app"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = ["model=tiny", "train.steps=2", "train.batch_size=4", "sample.steps=2", "device=cpu",
        "fl.rounds=2", "fl.min_sites=3", "fl.round_timeout=240"]
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "rounds.json").read_text())
    except (OSError, ValueError):
        return []


def _wait(what: str, ok, proc: subprocess.Popen, log, timeout: float = 900) -> float:
    """Seconds until ``ok()``; fails when m2diff-server exits or after ``timeout`` (generous:
    on a loaded 2-core machine a round took 220 s and a ServerApp was lost and resubmitted)."""
    t0 = time.monotonic()
    while not ok():
        assert proc.poll() is None, f"m2diff-server exited with {proc.returncode}: {log()[-3000:]}"
        assert time.monotonic() - t0 < timeout, f"{what} not seen after {timeout} s: {log()[-3000:]}"
        time.sleep(0.5)
    return time.monotonic() - t0


def _logs(folder: Path, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{name}.log*")))


def _status(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([tool("m2diff-server"), "status", f"out={out}"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.skipif(not Path("/usr/bin/ssh-keygen").exists(), reason="needs ssh-keygen")
def test_deployment_attacks_poison_restarts_and_resume(tmp_path, tiny_sites):
    pki = make_certs(tmp_path / "pki")
    keys = tmp_path / "keys"
    keys.mkdir()
    for site in (*SITES, "outsider"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                        str((tmp_path if site == "outsider" else keys) / f"{site}.key")],
                       check=True, timeout=60)
    out, port, link_port = tmp_path / "out", free_port(), free_port()
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    timings: dict[str, float] = {}
    # The coordinator's own flwr: the loopback SuperLink (what m2diff-server itself uses).
    home = tmp_path / "coordinator-flwr-home"
    write_connection(home, "link", f"127.0.0.1:{link_port}", root_certificates=pki.ca)
    own = Federation(home, "link", flower_env(home))
    ours = app_hash(REPO)  # the sites pin the app m2diff-server submits (and resubmits)

    def site_cmd(name: str, folder: Path) -> list[str]:
        cmd = [tool("m2diff-client"), f"superlink=127.0.0.1:{port}", f"root-certificates={pki.ca}",
               f"auth-key={keys / name}.key", f"data={folder}", f"site={name}",
               f"port={free_port()}", "threads=1", f"log-dir={tmp_path / name / 'logs'}",
               "log-max-mb=0.02", "log-backups=2", f"allow-fab=sha256:{ours}"]
        return cmd + ([f"cache-dir={tmp_path / name / 'cache'}"] if name == "hospital-a" else [])

    def site_env(name: str) -> dict:
        return {**env, "FLWR_HOME": str(tmp_path / name / "flwr-home")}

    with ProcessSet(tmp_path / "procs") as procs:
        server = procs.start("server", [
            tool("m2diff-server"), f"ca={pki.ca}", f"cert={pki.cert}", f"key={pki.key}",
            f"auth-keys={keys}", "host=127.0.0.1", f"port={port}", f"link-port={link_port}",
            f"out={out}", "log-max-mb=0.005", "log-backups=2", "restarts=6", *BASE], env)
        console = lambda: procs.log("server")  # noqa: E731
        wait_port(port, timeout=240, proc=server)  # after the SuperLink and the key registrations
        _wait("key registration", lambda: "register hospital-c.key.pub: registered" in console(),
              server, console, 300)
        _wait("run submission", lambda: "app (FAB) sha256" in console(), server, console, 300)
        state = json.loads((out / "server.json").read_text())
        first_run = int(state["run_id"])

        # 0. the outsider, before any site is there
        t0 = time.monotonic()
        got = attack(tmp_path / "outsider", "127.0.0.1", port, pki.ca,
                     tmp_path / "outsider.key.pub", int(state["front_max_bytes"]), run_id=first_run)
        timings["attacks_s"] = time.monotonic() - t0
        assert_refused(got)
        runs = json.loads(own.flwr("ls", "link", "--format", "json").stdout)["runs"]
        assert [int(r["run-id"]) for r in runs] == [first_run], runs  # no outsider's run
        assert not runs[0]["status"].startswith("finished")  # and ours was not stopped
        nodes = own.nodes()
        assert sorted(str(n["node-id"]) for n in nodes) == sorted(state["nodes"]), nodes
        assert set(state["nodes"].values()) == set(SITES)  # the outsider's key is not among them

        # 1.-2. the sites; hospital-c poisons its updates: a bare SuperNode with the ClientApp's
        # test hook, restarted by a shell loop when it ends (what m2diff-client does for a and b)
        site_c = procs.start("site-c", [
            "bash", "-c", 'while :; do "$@"; sleep 1; done', "loop",
            tool("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(pki.ca), "--auth-supernode-private-key",
            str(keys / "hospital-c.key"), "--port", str(free_port()), "--node-config",
            toml_pairs({"data-path": str(tiny_sites[2]), "site-name": "hospital-c",
                        "test-fault": "nan"})],
            flower_env(tmp_path / "c-home", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
        procs.start("site-a", site_cmd("hospital-a", tiny_sites[0]), site_env("hospital-a"))
        site_b = procs.start("site-b", site_cmd("hospital-b", tiny_sites[1]), site_env("hospital-b"))
        _wait("hospital-b's first train message", lambda: "Receiving: train message" in
              _logs(tmp_path / "hospital-b" / "logs", "supernode"), server, console)
        site_b.send_signal(signal.SIGTERM)  # like `docker stop`: the entry point only
        assert site_b.wait(timeout=60) == 0  # asked to stop: not a failure
        t_restart = time.monotonic()
        procs.start("site-b-2", site_cmd("hospital-b", tiny_sites[1]), site_env("hospital-b"))
        timings["round1_s"] = _wait("round 1", lambda: any(r["round"] >= 1 for r in _rows(out)),
                                    server, console)

        # 3. status while the run goes on
        res = _status(out, env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SuperNodes: 3 online" in res.stdout, res.stdout
        assert all(site in res.stdout for site in SITES)
        assert "running" in res.stdout and "round 1/2 done" in res.stdout, res.stdout
        print(f"\n$ m2diff-server status out={out}\n{res.stdout}")

        # 4. kill the front: restarted at once
        nginx = int(json.loads((out / "server.json").read_text())["front_pid"])
        os.kill(nginx, signal.SIGKILL)
        _wait("front restart", lambda: "the TLS front (nginx) exited (status -9); restarting it"
              in console(), server, console, 60)
        wait_port(port, timeout=30)

        # 5. kill the SuperLink
        link = [p for p in descendants(server.pid)
                if b"m2diff-flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(link) == 1
        os.kill(link[0], signal.SIGKILL)
        t_kill = time.monotonic()
        _wait("resubmission", lambda: "resuming after round 1" in console(), server, console, 300)
        evaluations = procs.log("site-c").count("Receiving: evaluate message")

        # 6. hospital-c's SuperNode gets round 2's evaluate message: kill it hard (no goodbye
        # to the SuperLink, which counts it online until two heartbeats are missed)
        _wait("hospital-c's round 2 evaluation", lambda: procs.log("site-c").count(
            "Receiving: evaluate message") > evaluations, server, console)
        family = [site_c.pid, *descendants(site_c.pid)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        t_dead = time.monotonic()
        assert server.wait(timeout=900) == 0, console()[-4000:]
        timings["after_superlink_kill_s"] = time.monotonic() - t_kill
        timings["after_site_c_kill_s"] = time.monotonic() - t_dead
        timings["supernode_restart_to_end_s"] = time.monotonic() - t_restart

        text = console()
        assert re.search(r"the SuperLink exited \(status -9\); restarting it \(\d/6 restarts\)", text)
        assert "submitted again as run" in text and "resuming after round 1" in text
        assert "register hospital-b.key.pub: already registered" in text
        assert "public: POST /v1/fleet/{12 Fleet routes}, GET /health" in text
        for rnd in (1, 2):
            assert f"round {rnd}/2 done in" in text
            assert f"round {rnd} train: rejected update from site hospital-c: " in text
        rows = _rows(out)
        assert sorted({int(r["round"]) for r in rows}) == [1, 2]
        for rnd in (1, 2):
            poisoned = [r for r in rows if r["round"] == rnd and r["site"] == "hospital-c"]
            assert poisoned and all("non-finite" in r["rejected"] and "train_loss" not in r
                                    for r in poisoned), poisoned
            assert all(r["global_updated"] == 1 for r in rows if r["round"] == rnd)
        assert all("train_loss" in r for r in rows if r["round"] == 1 and r["site"] == "hospital-a")
        round2 = [r for r in rows if r["round"] == 2]
        # hospital-c was dropped from round 2's evaluation (killed), a and b trained
        assert {r["site"] for r in round2 if "rejected" not in r} == {"hospital-a", "hospital-b"}
        assert all("train_loss" in r for r in round2 if "rejected" not in r)
        assert "round 2 evaluate: no result from hospital-c" in _logs(out / "logs", "run")
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["extra"]["round"] == 2
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        state = json.loads((out / "server.json").read_text())
        # 1: the kill (more only where its flower-superexec died under load and m2diff-server
        # restarted the SuperLink for that, saying so)
        assert state["status"] == "finished:completed" and state["superlink_restarts"] >= 1
        assert state["front_restarts"] == 1 and state["auth"] is True
        # 2 runs: the first and its resubmission after the SuperLink kill (more only where a
        # ServerApp was lost under load, e.g. SQLite's "database is locked" making the
        # SuperLink answer 500: m2diff-server resubmits those too, and says so)
        lost = text.count("lost its ServerApp")
        assert len(state["runs"]) == 2 + lost and state["pid"] is None
        assert set(state["nodes"].values()) == set(SITES)
        # 7. the app's FAB sha256: one per run, printed, equal to Flower's build of the folder
        from server.fabhash import fab_sha256

        hashes = {state["fab_sha256"][str(r)] for r in state["runs"]}
        assert hashes == {state["app_sha256"]} == {fab_sha256(REPO)} == {ours}
        assert f"app (FAB) sha256 {state['app_sha256']}" in text

        # after the end: no SuperLink, but the files still tell the story
        res = _status(out, env)
        assert res.returncode == 1 and "does not answer" in res.stdout
        assert "round 2/2 done" in res.stdout and "SuperLink restarts" in res.stdout
        print(res.stdout)

    # log files, rotated at 5 kB with at most 2 backups
    logs = out / "logs"
    names = sorted(p.name for p in logs.iterdir())
    for name in ("run", "superlink"):
        assert f"{name}.log.1" in names and f"{name}.log.3" not in names, names
    assert all((logs / n).stat().st_size < 2 * int(0.005 * 2**20) for n in names)
    # the SuperLink's own output (its start line may have rotated out: 5 kB files here)
    assert "[uvicorn" in _logs(logs, "superlink")
    assert "\x1b[" not in _logs(logs, "superlink")
    assert "ROUND 2/2" in _logs(logs, "run")
    front = _logs(logs, "front")
    assert '"POST /v1/control/list-runs HTTP/1.1" 404' in front  # the outsider's flwr ls
    # the sites' answered calls are not logged (those that failed while the SuperLink was
    # down, 502, are: the front logs refused and failed requests only)
    assert not re.search(r'"POST /v1/fleet/[a-z-]+ HTTP/1\.1" [23]\d\d', front), front[-2000:]
    own_log = _logs(logs, "m2diff-server")
    assert "round 2/2 done" in own_log and "the SuperLink exited" in own_log
    site_logs = tmp_path / "hospital-a" / "logs"
    assert "Starting Flower SuperNode" in _logs(site_logs, "supernode")
    assert len(list(site_logs.glob("supernode.log*"))) <= 3
    assert "starting SuperNode for site hospital-a" in _logs(site_logs, "m2diff-client")
    assert any((tmp_path / "hospital-a" / "cache").iterdir()), "site cache-dir not used"
    print("deployment timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))


def test_pinned_site_refuses_a_hostile_app(tmp_path, tiny_sites):
    """Issue 12's app substitution: whoever can submit a run (here the coordinator's own
    loopback flwr) sends a ClientApp that returns a site's participants.tsv, file list and
    environment names. A plain SuperNode runs it and leaks; the pinned m2diff-client refuses
    it before any of its code runs (error reply ``site-app-not-allowed``, no marker file, its
    log names the hash)."""
    ours = app_hash(REPO)
    logs = tmp_path / "hospital-a-logs"
    markers, loot = tmp_path / "markers", tmp_path / "loot"
    markers.mkdir()
    with ProcessSet(tmp_path / "procs") as procs:
        fed = LocalFederation.start(procs)
        procs.start("site-a", [
            tool("m2diff-client"), f"superlink=127.0.0.1:{fed.port}",
            f"root-certificates={fed.certs.ca}", f"data={tiny_sites[0]}", "site=hospital-a",
            f"port={free_port()}", "threads=1", f"allow-fab=sha256:{ours}", f"log-dir={logs}",
            f"state-dir={tmp_path / 'hospital-a-state'}"], fed.ctl.env)
        fed.supernode("site-b", {"data-path": str(tiny_sites[1]), "site-name": "hospital-b"})
        deadline = time.monotonic() + 180
        while sum(n.get("status") == "online" for n in fed.ctl.nodes()) < 2:
            assert time.monotonic() < deadline, procs.log("site-a")[-3000:]
            time.sleep(1)
        hostile_id = fed.ctl.submit(HOSTILE, {"out-dir": str(loot), "marker-dir": str(markers)})
        row = fed.ctl.wait(hostile_id, timeout=300, stream=False)
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
