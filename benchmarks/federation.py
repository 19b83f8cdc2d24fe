"""What a deployed round costs around its training: a real loopback federation, timed.

    .venv/bin/python benchmarks/federation.py [sites=3] [rounds=2] \
        [transports=arrays,float32,float16,bfloat16] [out=runs/benchmark-federation] [key=value ...]

For each ``fl.transport`` in ``transports`` it runs the deployment a coordinator and its
hospitals run, on 127.0.0.1: ``m2diff-server`` (TLS, SuperNode auth, the nginx front, the
SuperLink on loopback) with ``rounds`` rounds of the tiny M2Diff, and ``sites`` ``m2diff-client``
sites (one generated tiny site each, certificates and keys from deploy/make-certs.sh). Every
run starts from the same seed on the same sites, so the runs differ only in how the weights
travel (m2diff/transport.py; ``arrays`` is Flower's own one-object-per-array record).

From the coordinator's ``rounds.json`` it prints, per transport and round:

* the train and evaluate phases' wall time as the ServerApp saw them, beside the slowest
  site's own training / evaluation seconds (the rest is the round's cost around them);
* the ClientApp's start-up: seconds from the ``flwr-clientapp`` process's start to its train
  handler (interpreter, imports, the message moved into the process) and from there to the
  first training step (run config checked, site opened, slices loaded from the site cache);
* megabytes of weights per site per round (both ways) and the held-out PSNR of the last round
  (mean over sites), with its difference to the float32 run.

Extra words are Hydra overrides for every run (e.g. ``train.steps=20``). Writes
``<out>/federation.json`` and ``<out>/federation.md``. Needs nginx and openssl (like the
deployment tests); each run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = ["model=tiny", "train.steps=2", "train.batch_size=4", "sample.steps=1", "device=cpu",
        "fl.round_timeout=600"]
OWN = {"sites": "3", "rounds": "2", "transports": "arrays,float32,float16,bfloat16",
       "out": "runs/benchmark-federation"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def prepare(out: Path, sites: int) -> tuple[Path, list[Path], list[str]]:
    """Certificates + site keys (deploy/make-certs.sh) and ``sites`` generated tiny sites."""
    names = [f"hospital-{chr(ord('a') + i)}" for i in range(sites)]
    pki = out / "pki"
    if not (pki / "superlink.crt").exists():
        subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(pki), "IP:127.0.0.1",
                        *names], check=True, capture_output=True, timeout=300)
    data = out / "sites"
    if not data.exists():
        subprocess.run([tool("m2diff"), "generate", f"out={data}", "generate=tiny",
                        f"generate.sites={sites}", "generate.subjects=4"], check=True, timeout=900)
    dirs = sorted(p for p in data.iterdir() if p.is_dir())[:sites]
    return pki, dirs, names


def run_one(out: Path, pki: Path, dirs: list[Path], names: list[str], rounds: int,
            transport: str, overrides: list[str]) -> list[dict[str, Any]]:
    """One deployment with ``fl.transport=transport``; its rounds.json rows."""
    run_dir = out / transport
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    server_cmd = [tool("m2diff-server"), f"ca={pki / 'ca.crt'}", f"cert={pki / 'superlink.crt'}",
                  f"key={pki / 'superlink.key'}", f"auth-keys={pki / 'sites'}", "host=127.0.0.1",
                  f"port={port}", f"out={run_dir / 'out'}", *BASE, f"fl.rounds={rounds}",
                  f"fl.min_sites={len(dirs)}", f"fl.transport={transport}", *overrides]
    app = subprocess.run([tool("m2diff-client"), "fab-hash", str(ROOT)], capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()[-1]  # the sites pin it
    procs: list[subprocess.Popen] = []
    logs = run_dir / "logs"
    logs.mkdir()
    try:
        with open(logs / "server.txt", "w") as log:
            server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, cwd=run_dir)
        procs.append(server)
        for name, folder in zip(names, dirs, strict=True):
            cmd = [tool("m2diff-client"), f"superlink=127.0.0.1:{port}",
                   f"root-certificates={pki / 'ca.crt'}", f"auth-key={pki / 'sites' / name}.key",
                   f"data={folder}", f"site={name}", f"port={free_port()}", "threads=1",
                   f"log-dir={run_dir / name / 'logs'}", f"cache-dir={out / 'cache' / name}",
                   f"allow-fab={app}"]
            with open(logs / f"{name}.txt", "w") as log:
                procs.append(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run_dir,
                    env={**env, "FLWR_HOME": str(run_dir / name / "flwr-home")}))
        deadline = time.monotonic() + 3600
        while server.poll() is None and time.monotonic() < deadline:
            for proc, name in zip(procs[1:], names, strict=True):
                if proc.poll() not in (None, 0):
                    tail = (logs / f"{name}.txt").read_text()[-2000:]
                    raise RuntimeError(f"m2diff-client {name} exited {proc.returncode}:\n{tail}")
            time.sleep(1)
        code = server.poll()
        if code != 0:
            tail = (logs / "server.txt").read_text()[-3000:]
            raise RuntimeError(f"m2diff-server (fl.transport={transport}) exited {code}:\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return json.loads((run_dir / "out" / "rounds.json").read_text())


def summarise(transport: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per round: phases vs the sites' own seconds, start-up, bytes, PSNR."""
    lines = []
    for rnd in sorted({int(r["round"]) for r in rows}):
        site_rows = [r for r in rows if int(r["round"]) == rnd and r.get("cohort") == "ALL"
                     and int(r.get("n", 0)) > 0]
        if not site_rows:
            continue

        def top(key: str, site_rows: list[dict[str, Any]] = site_rows) -> float:
            return max(float(r.get(key, 0) or 0) for r in site_rows)
        lines.append({
            "transport": transport, "round": rnd,
            "train_wall_s": float(site_rows[0]["round_train_s"]), "site_train_s": top("train_seconds"),
            "evaluate_wall_s": float(site_rows[0]["round_evaluate_s"]),
            "site_evaluate_s": top("eval_seconds"),
            "process_to_handler_s": top("train_process_seconds"),
            "handler_to_first_step_s": top("train_setup_seconds"),
            "mb_per_site": float(site_rows[0].get("round_mb_per_site", 0) or 0),
            "psnr": statistics.fmean(float(r["psnr"]) for r in site_rows),
        })
    return lines


COLUMNS = [("transport", "transport", "{}"), ("round", "round", "{}"),
           ("train_wall_s", "train phase s", "{:.1f}"), ("site_train_s", "site trains s", "{:.1f}"),
           ("evaluate_wall_s", "evaluate phase s", "{:.1f}"),
           ("site_evaluate_s", "site evaluates s", "{:.1f}"),
           ("process_to_handler_s", "ClientApp start -> handler s", "{:.1f}"),
           ("handler_to_first_step_s", "handler -> 1st step s", "{:.2f}"),
           ("mb_per_site", "MB / site / round", "{:.2f}"), ("psnr", "PSNR dB", "{:.3f}"),
           ("dpsnr", "vs float32 dB", "{:+.3f}")]


def markdown(lines: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt.format(line[key]) if key in line else "" for key, _, fmt in COLUMNS)
            + " |" for line in lines]
    return "\n".join([head, rule, *body])


def main(argv: list[str]) -> int:
    own = dict(OWN)
    overrides = []
    for word in argv:
        key, sep, value = word.partition("=")
        if sep and key in own:
            own[key] = value
        else:
            overrides.append(word)
    out = (ROOT / own["out"]).resolve() if not Path(own["out"]).is_absolute() else Path(own["out"])
    out.mkdir(parents=True, exist_ok=True)
    pki, dirs, names = prepare(out, int(own["sites"]))
    lines: list[dict[str, Any]] = []
    walls: dict[str, float] = {}
    for transport in [t.strip() for t in own["transports"].split(",") if t.strip()]:
        t0 = time.monotonic()
        print(f"[federation] fl.transport={transport}: {len(dirs)} sites, {own['rounds']} rounds",
              flush=True)
        rows = run_one(out, pki, dirs, names, int(own["rounds"]), transport, overrides)
        walls[transport] = time.monotonic() - t0
        lines += summarise(transport, rows)
    last = max(line["round"] for line in lines)
    ref = {line["round"]: line["psnr"] for line in lines if line["transport"] == "float32"}
    for line in lines:
        if line["round"] in ref:
            line["dpsnr"] = line["psnr"] - ref[line["round"]]
    table = markdown(lines)
    text = (f"{len(dirs)} sites, {own['rounds']} rounds, overrides: {' '.join(BASE + overrides)}\n\n"
            f"{table}\n\nwhole run (start-up of the coordinator and sites included): "
            + ", ".join(f"{t} {s:.0f} s" for t, s in walls.items()) + f"\n(last round: {last})\n")
    print(text)
    (out / "federation.md").write_text(text)
    (out / "federation.json").write_text(json.dumps({"lines": lines, "wall_s": walls}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
