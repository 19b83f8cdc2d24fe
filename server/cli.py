"""``m2diff-server [key=value ...]``: run the coordinator of a federation.

Starts ``flower-superlink`` (TLS by default), submits this repository's Flower app with
``flwr run``, streams the run's log, reads the real outcome from ``flwr ls`` (``flwr run``
exits 0 even when the ServerApp fails), prints the final per-site table from ``out`` and
stops the SuperLink. Exit status: 0 completed, 1 failed, 2 usage error.

Keys (everything else is a Hydra override, e.g. ``model=tiny fl.rounds=5 train.steps=200``):
  ca=, cert=, key=   TLS: CA certificate, SuperLink certificate (SANs = what sites dial), key
  insecure=true      plain HTTP instead (testing only; explicit)
  auth=true          only SuperNodes whose public key is registered may join
  auth-keys=DIR      with auth: register every DIR/*.pub (``ssh-keygen -t ecdsa -b 384``)
  host=0.0.0.0       address the SuperLink listens on; port=8000 (one port: Fleet+Control)
  address=           what this command dials (default 127.0.0.1:PORT; must match a SAN)
  out=DIR            checkpoint.pt, rounds.csv/json/png, superlink.log (default runs/federated)
  database=PATH      SuperLink state file (default in memory)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from m2diff.config import ConfigError, compose, resolve_path
from server.flwrctl import (
    Federation,
    FlowerError,
    flower_env,
    run_outcome,
    stop_group,
    tool,
    write_connection,
)

KEYS = {"ca", "cert", "key", "insecure", "auth", "auth-keys", "host", "port", "address", "out",
        "database", "app"}
APP_DIR = Path(__file__).resolve().parents[1]


def parse_words(words: Sequence[str], keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` words into this command's keys and Hydra overrides."""
    args: dict[str, str] = {}
    overrides: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"'{word}' is not key=value")
        if key in keys:
            args[key] = value
        else:
            overrides.append(word)
    return args, overrides


def truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def superlink_command(args: dict[str, str], port: int) -> list[str]:
    """The flower-superlink command line for these settings."""
    cmd = [tool("flower-superlink"), "--host", args.get("host", "0.0.0.0"), "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if truthy(args.get("insecure")):
        if truthy(args.get("auth")):
            raise ConfigError("auth=true needs TLS: give ca=, cert=, key= instead of insecure=true")
        cmd.append("--insecure")
    else:
        files = {k: resolve_path(args.get(k)) for k in ("ca", "cert", "key")}
        missing = [k for k, v in files.items() if v is None or not v.is_file()]
        if missing:
            raise ConfigError(f"TLS needs existing files for {', '.join(k + '=' for k in missing)} "
                              "(deploy/make-certs.sh makes them; insecure=true for plain HTTP)")
        cmd += ["--ssl-ca-certfile", str(files["ca"]), "--ssl-certfile", str(files["cert"]),
                "--ssl-keyfile", str(files["key"])]
    if truthy(args.get("auth")):
        cmd.append("--enable-supernode-auth")
    if args.get("database"):
        cmd += ["--database", str(resolve_path(args["database"]))]
    return cmd


def print_table(out: Path) -> None:
    """The last round's per-site, per-cohort table from out/rounds.json."""
    from m2diff.fedutil import TABLE_COLUMNS, table_rows
    from m2diff.report import print_table as rich_table

    path = out / "rounds.json"
    if not path.is_file():
        print(f"m2diff-server: no {path}", file=sys.stderr)
        return
    rows = json.loads(path.read_text())
    if rows:
        last = max(int(r["round"]) for r in rows)
        rich_table(table_rows([r for r in rows if int(r["round"]) == last], "federated"),
                   f"Held-out test subjects after round {last} ({out})", TABLE_COLUMNS)


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerError(f"flower-superlink exited with status {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FlowerError(f"flower-superlink does not listen on {host}:{port} after {timeout} s")


def serve(args: dict[str, str], overrides: list[str]) -> int:
    """Start the SuperLink, run the app once, stop the SuperLink; return the exit status."""
    cfg = compose(overrides)  # fail fast on a bad setting, before any process starts
    out = resolve_path(args.get("out") or "runs/federated")
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    port = int(args.get("port", 8000))
    cmd = superlink_command(args, port)
    # A private FLWR_HOME outside out-dir: Flower installs the app bundle there, and a copy
    # of the sources inside a folder of the app would end up in the next bundle.
    home = Path(tempfile.mkdtemp(prefix="m2diff-flwr-"))
    address = args.get("address") or f"127.0.0.1:{port}"
    insecure = truthy(args.get("insecure"))
    write_connection(home, "m2diff", address, resolve_path(args.get("ca")), insecure=insecure)
    env = flower_env(home)
    ctl = Federation(home, "m2diff", env)
    with open(out / "superlink.log", "ab") as log:
        link = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_port("127.0.0.1", port, link)
        print(f"m2diff-server: SuperLink on {args.get('host', '0.0.0.0')}:{port} "
              f"({'plain HTTP' if insecure else 'TLS'}{', SuperNode auth' if truthy(args.get('auth')) else ''}); "
              f"log {out / 'superlink.log'}", flush=True)
        if truthy(args.get("auth")) and args.get("auth-keys"):
            for pub in sorted(Path(str(resolve_path(args["auth-keys"]))).glob("*.pub")):
                res = ctl.flwr("supernode", "register", str(pub), "m2diff")
                print(f"m2diff-server: register {pub.name}: "
                      f"{'ok' if res.returncode == 0 else (res.stdout + res.stderr).strip()[-200:]}")
        app_dir = Path(args.get("app") or APP_DIR)
        run_id = ctl.submit(app_dir, {"out-dir": str(out), "overrides": " ".join(overrides)})
        print(f"m2diff-server: run {run_id} submitted; waiting for {cfg.fl.min_sites} site(s)",
              flush=True)
        budget = float(cfg.fl.rounds) * 2 * float(cfg.fl.round_timeout) + 600
        row = ctl.wait(run_id, timeout=budget, stream=True)
        ok, text = run_outcome(row)
        print(f"m2diff-server: run {run_id} {text}", flush=True)
        print_table(out)
        return 0 if ok else 1
    finally:
        stop_group(link)
        shutil.rmtree(home, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return 0
    try:
        args, overrides = parse_words(words, KEYS)
        return serve(args, overrides)
    except ConfigError as exc:
        print(f"m2diff-server: {exc}", file=sys.stderr)
        return 2
    except FlowerError as exc:
        print(f"m2diff-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2diff-server: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
