"""Operations a coordinator relies on, with the real commands on 127.0.0.1 (TLS, SuperNode auth):
``m2diff-server`` / ``m2diff-client`` processes, a SuperNode restarted mid-run, a SuperLink
killed mid-run, ``m2diff-server status``, progress lines and rotated log files.

One federation of two tiny sites and two rounds, so the torch imports are paid once
(about 4 minutes on 2 shared cores; a round costs ~90 s here, almost all of it process starts):
1. as round 1's training starts, hospital-b's m2diff-client is stopped (SIGTERM, like
   ``docker stop``) and started again with the same key: it rejoins with its node id and
   answers again (in round 1's evaluation or round 2);
2. round 1 done -> ``m2diff-server status`` lists both sites online and the run at 1/2;
3. the SuperLink is killed (SIGKILL): m2diff-server starts it again on the same state
   database, the sites reconnect with their node ids, and the lost run is submitted again,
   resuming after round 1; the command exits 0 with both rounds in rounds.json and both
   sites trained in round 2;
4. the log files: our own lines, the SuperLink's, the ServerApp's and the SuperNode's output,
   rotated at a tiny size; the site's cache went to its own cache-dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from client.app_pinning import app_hash
from server.flwrctl import descendants, tool
from tests.flower_procs import REPO, ProcessSet, free_port, make_certs, wait_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASE = ["model=tiny", "train.steps=2", "train.batch_size=4", "sample.steps=2", "device=cpu",
        "fl.rounds=2", "fl.min_sites=2", "fl.round_timeout=240"]


def _rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "rounds.json").read_text())
    except (OSError, ValueError):
        return []


def _wait_round(out: Path, rnd: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(int(r["round"]) >= rnd for r in _rows(out)):
            return time.monotonic() - t0
        assert proc.poll() is None, f"m2diff-server exited with {proc.returncode}"
        time.sleep(1)
    raise TimeoutError(f"round {rnd} not done after {timeout} s")


def _logs(folder: Path, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{name}.log*")))


def _status(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([tool("m2diff-server"), "status", f"out={out}"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.skipif(not Path("/usr/bin/ssh-keygen").exists(), reason="needs ssh-keygen")
def test_status_logs_supernode_rejoin_and_superlink_restart(tmp_path, tiny_sites):
    pki = make_certs(tmp_path / "pki")
    keys = tmp_path / "keys"
    keys.mkdir()
    for site in ("hospital-a", "hospital-b"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                        str(keys / f"{site}.key")], check=True, timeout=60)
    out, port = tmp_path / "out", free_port()
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    timings: dict[str, float] = {}

    ours = app_hash(REPO)  # the sites pin the app m2diff-server submits (and resubmits)

    def site_cmd(name: str, folder: Path) -> list[str]:
        cmd = [tool("m2diff-client"), f"superlink=127.0.0.1:{port}", f"root-certificates={pki.ca}",
               f"auth-key={keys / name}.key", f"data={folder}", f"site={name}",
               f"port={free_port()}", "threads=1", f"log-dir={tmp_path / name / 'logs'}",
               "log-max-mb=0.02", "log-backups=2", f"allow-fab={ours}"]
        return cmd + ([f"cache-dir={tmp_path / name / 'cache'}"] if name == "hospital-a" else [])

    def site_env(name: str) -> dict:
        return {**env, "FLWR_HOME": str(tmp_path / name / "flwr-home")}

    with ProcessSet(tmp_path / "procs") as procs:
        server = procs.start("server", [
            tool("m2diff-server"), f"ca={pki.ca}", f"cert={pki.cert}", f"key={pki.key}", "auth=true",
            f"auth-keys={keys}", "host=127.0.0.1", f"port={port}", f"out={out}",
            "log-max-mb=0.005", "log-backups=2", *BASE], env)
        wait_port(port, proc=server)
        deadline = time.monotonic() + 120  # an unregistered SuperNode would exit 305
        while "register hospital-b.key.pub: registered" not in procs.log("server"):
            assert time.monotonic() < deadline and server.poll() is None, procs.log("server")
            time.sleep(0.5)
        procs.start("site-a", site_cmd("hospital-a", tiny_sites[0]), site_env("hospital-a"))
        site_b = procs.start("site-b", site_cmd("hospital-b", tiny_sites[1]), site_env("hospital-b"))

        # 1. restart hospital-b's SuperNode as round 1's training reaches it
        deadline = time.monotonic() + 240
        while "Receiving: train message" not in _logs(tmp_path / "hospital-b" / "logs", "supernode"):
            assert time.monotonic() < deadline and server.poll() is None, procs.log("server")[-3000:]
            time.sleep(0.5)
        site_b.send_signal(signal.SIGTERM)  # like `docker stop`: the entry point only
        assert site_b.wait(timeout=60) == 0  # asked to stop: not a failure
        t_restart = time.monotonic()
        procs.start("site-b-2", site_cmd("hospital-b", tiny_sites[1]), site_env("hospital-b"))
        timings["round1_s"] = _wait_round(out, 1, server)

        # 2. status while the run goes on
        res = _status(out, env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SuperNodes: 2 online" in res.stdout, res.stdout
        assert "hospital-a" in res.stdout and "hospital-b" in res.stdout
        assert "running" in res.stdout and "round 1/2 done" in res.stdout, res.stdout
        print(f"\n$ m2diff-server status out={out}\n{res.stdout}")

        # 3. kill the SuperLink
        link = [p for p in descendants(server.pid)
                if b"flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(link) == 1
        os.kill(link[0], signal.SIGKILL)
        t_kill = time.monotonic()
        assert server.wait(timeout=400) == 0, procs.log("server")[-4000:]
        timings["after_superlink_kill_s"] = time.monotonic() - t_kill
        rejoined = [int(r["round"]) for r in _rows(out) if r["site"] == "hospital-b"]
        timings["supernode_restart_to_end_s"] = time.monotonic() - t_restart

        console = procs.log("server")
        assert "the SuperLink exited (status -9); restarting it (1/3 restarts)" in console
        assert "submitted again as run" in console and "resuming after round 1" in console
        assert "register hospital-b.key.pub: already registered" in console
        for rnd in (1, 2):
            assert f"round {rnd}/2 done in" in console
        rows = _rows(out)
        assert sorted({int(r["round"]) for r in rows}) == [1, 2]
        round2 = [r for r in rows if int(r["round"]) == 2]
        assert {r["site"] for r in round2} == {"hospital-a", "hospital-b"}
        assert all("train_loss" in r for r in round2), "both sites trained after the restarts"
        state = json.loads((out / "server.json").read_text())
        assert state["status"] == "finished:completed" and state["superlink_restarts"] == 1
        assert len(state["runs"]) == 2 and state["pid"] is None
        assert set(state["nodes"].values()) == {"hospital-a", "hospital-b"}

        # after the end: no SuperLink, but the files still tell the story
        res = _status(out, env)
        assert res.returncode == 1 and "does not answer" in res.stdout
        assert "round 2/2 done" in res.stdout and "SuperLink restarts 1" in res.stdout
        print(res.stdout)

    # 4. log files, rotated at 5 kB with at most 2 backups
    logs = out / "logs"
    names = sorted(p.name for p in logs.iterdir())
    for name in ("run", "superlink"):
        assert f"{name}.log.1" in names and f"{name}.log.3" not in names, names
    assert all((logs / n).stat().st_size < 2 * int(0.005 * 2**20) for n in names)
    assert "Starting Flower SuperLink" in _logs(logs, "superlink")
    assert "\x1b[" not in _logs(logs, "superlink")
    assert "ROUND 2/2" in _logs(logs, "run")
    own = _logs(logs, "m2diff-server")
    assert "round 2/2 done" in own and "the SuperLink exited" in own
    site_logs = tmp_path / "hospital-a" / "logs"
    assert "Starting Flower SuperNode" in _logs(site_logs, "supernode")
    assert len(list(site_logs.glob("supernode.log*"))) <= 3
    assert "starting SuperNode for site hospital-a" in _logs(site_logs, "m2diff-client")
    assert any((tmp_path / "hospital-a" / "cache").iterdir()), "site cache-dir not used"
    print("ops timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}),
          "hospital-b's rows after its restart: rounds", sorted(set(rejoined)))
