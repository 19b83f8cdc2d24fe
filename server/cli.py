"""``m2diff-server [key=value ...]``: run the coordinator of a federation.
``m2diff-server status out=DIR``: who is connected, how far the run is, each site's last metrics.

Starts ``flower-superlink`` (TLS by default) on 127.0.0.1 only, with its state in a database
under ``out``, and in front of it the public port: an nginx TLS front (server/front.py) that
passes only the Fleet API routes a SuperNode uses and ``/health``, never the Control API
(``flwr run/ls/stop``, ``flwr supernode register``) or the ServerApp runtime API, which
Flower 1.42 serves on the same port without checking the caller. Then it submits this
repository's Flower app with ``flwr run`` (to the loopback SuperLink), prints and records
the app's FAB sha256 (what a hospital pins), streams the run's log, prints one progress line
per finished round, reads the real outcome from ``flwr ls`` (``flwr run`` exits 0 even when
the ServerApp fails), prints the final per-site table and stops the front and the SuperLink.
A SuperLink or front that dies during the run is started again (the sites reconnect by
themselves); a run lost with its SuperLink is submitted again and resumes after the last
checkpointed round. Exit status: 0 completed, 1 failed, 2 usage error.

Keys (everything else is a Hydra override, e.g. ``model=tiny fl.rounds=5 train.steps=200``):
  ca=, cert=, key=   TLS: CA certificate, SuperLink certificate, key; the certificate names
                     the address sites dial AND IP:127.0.0.1 + DNS:localhost (the loopback
                     SuperLink; deploy/make-certs.sh adds both)
  insecure=true      plain HTTP instead (testing only; explicit; needs auth=false)
  auth=true          (default) only SuperNodes whose public key is registered may join;
                     auth=false is for tests only and says so loudly
  auth-keys=DIR      with auth: register every DIR/*.pub (``ssh-keygen -t ecdsa -b 384``); the
                     file name (hospital-a.key.pub -> hospital-a) names the site, and a reply
                     from that node may not claim another name
  host=0.0.0.0       address the public front (nginx) listens on; port=8000 its port
  link-port=         the SuperLink's loopback port (default: a free one, kept in server.json)
  front-max-mb=      largest request the front passes, MiB (default 4 x the model's size)
  address=           what this command's own flwr CLI dials (default 127.0.0.1:LINK_PORT)
  out=DIR            checkpoint.pt, rounds.csv/json/png, server.json (default runs/federated)
  database=PATH      SuperLink state (registered nodes, runs); default OUT/superlink-state.db,
                     database=memory keeps it in memory (a restarted SuperLink forgets the sites)
  restarts=3         how often, per command, a SuperLink or front that died is started again,
                     or a run whose ServerApp vanished ("No heartbeat received from the task")
                     is submitted again (resuming); a ServerApp that raised is never retried
  log-dir=DIR        log files (default OUT/logs): m2diff-server.log (this command), superlink.log
                     (the SuperLink's output), front.log (refused and failed requests at the
                     public port, nginx errors), run.log (the ServerApp's log)
  log-max-mb=10      rotate a log file at this size ...
  log-backups=5      ... keeping this many old files (NAME.log.1 .. NAME.log.5)
``status`` takes out= (and, when they differ from what the running command recorded in
OUT/server.json, address=, ca=, insecure=); exit status 0 when the SuperLink answered.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

from m2diff.config import ConfigError, compose, resolve_path
from m2diff.ops import FlowerError
from m2diff.ops.flower import run_outcome
from m2diff.ops.logs import LEVEL_FORMAT, Say, close_logger, file_logger, log_settings
from m2diff.ops.words import parse_words
from m2diff.runconfig import overrides_text
from server.coordinator import Coordinator
from server.runstate import RoundLines, print_last_round
from server.status import status

KEYS = {"ca", "cert", "key", "insecure", "auth", "auth-keys", "host", "port", "link-port",
        "front-max-mb", "address", "out", "database", "app", "restarts", "log-dir", "log-max-mb",
        "log-backups"}


def serve(args: dict[str, str], overrides: list[str]) -> int:
    """Start the SuperLink, run the app (again after a SuperLink restart), stop the SuperLink;
    return the exit status."""
    import os

    from server.strategy_settings import check_strategy

    cfg = compose(overrides)  # fail fast on a bad setting, before any process starts
    overrides_text(overrides)  # ... or on words the apps would not get back whole
    try:
        check_strategy(cfg.fl)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = resolve_path(args.get("out") or "runs/federated")
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    logs = log_settings(args, out / "logs")
    own = file_logger(logs, "m2diff-server", LEVEL_FORMAT)
    say = Say("m2diff-server", own)
    try:
        coord = Coordinator(args, overrides, out, logs, say)
    except BaseException:
        close_logger(own)
        raise
    if not coord.auth:
        say("auth=false: ANY SuperNode holding ca.crt may join, receive the model and send updates. "
            "For tests only; a federation runs with auth=true auth-keys=DIR", err=True)
    try:
        coord.save(pid=os.getpid())
        coord.stop_leftover_link()
        coord.start_link()
        coord.start_front()
        coord.stop_stale_run()
        progress = RoundLines(out, int(coord.cfg.fl.rounds), say)
        run_id = coord.submit()
        say(f"run {run_id} submitted; waiting for {coord.cfg.fl.min_sites} site(s)")
        row = coord.supervise(run_id, progress)
        ok, text = run_outcome(row)
        run_id = int(coord.state["run_id"])
        say(f"run {run_id} {text}", err=not ok)
        coord.save(status=str(row.get("status", "?")))
        print_last_round(out)
        return 0 if ok else 1
    except BaseException as exc:
        coord.save(status=f"m2diff-server stopped: {type(exc).__name__}")
        raise
    finally:
        coord.close()
        coord.save(pid=None, superlink_pid=None, front_pid=None)
        close_logger(own)


# -- m2diff-server status --------------------------------------------------------------------

def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return 0
    command = "serve"
    if words and words[0] == "status":
        command, words = "status", words[1:]
    try:
        args, overrides = parse_words(words, KEYS)
        if command == "status":
            if overrides:
                raise ConfigError(f"status takes out=, address=, ca=, insecure=, port= only, "
                                  f"not {' '.join(overrides)}")
            return status(args)
        with contextlib.suppress(ValueError):  # not in the main thread (tests)
            signal.signal(signal.SIGTERM, _terminate)
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
