"""Keep a site's SuperNode running: restart it when it ends or loses its Fleet connection,
give up after ``join-timeout`` seconds of failures, stop it with exactly one SIGTERM so
that it tells the SuperLink it leaves (m2diff-client; exit codes in client/cli.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from m2diff.ops.logs import Say, start_logged
from m2diff.ops.procs import descendants, stop_group, stop_pids


class _Stop(Exception):
    """SIGTERM / SIGINT: stop the SuperNode, exit 0."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def stop_supernode(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop the SuperNode so that it tells the SuperLink it leaves (Flower deactivates the
    node in its SIGTERM handler; a second SIGTERM kills it before that, and the SuperLink
    then refuses the same key as "still online" for up to two heartbeats, ~60 s).

    It may have got the signal already (systemd signals the whole service, a terminal the
    whole foreground group): give it a moment first, then send exactly one SIGTERM."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=3)
    if proc.poll() is None:
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s=1)
        stop_pids(family, grace_s=2)


# Flower 1.42: a SuperNode whose Fleet request gets a 5xx (seen: the SuperLink's SQLite
# "database is locked" under load) logs this, deactivates its node and never reconnects,
# while its process stays up. m2diff-client then restarts it.
# (Only that bare line: "Failed to send message ...: Server error ..." is not fatal.)
_FLEET_LOST = re.compile(r"ERROR\W*(?:\[0m)?\W*Server error '5\d\d [^']*' for url '[^']*/v1/fleet/")


class Attempt:
    """What one SuperNode process said about how it ended (Flower's exit code, TLS, a lost
    Fleet connection)."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.tls = False
        self.lost = False
        self.started = time.monotonic()

    def watch(self, line: str) -> None:
        match = re.search(r"Exit Code: (\d+)", line)
        if match:
            self.code = int(match.group(1))
        if "CERTIFICATE_VERIFY_FAILED" in line:
            self.tls = True
        if _FLEET_LOST.search(line):
            self.lost = True


def run_supernode(cmd: list[str], env: dict[str, str], log: logging.Logger,
                  supernode_log: logging.Logger, join_timeout: float = 300.0,
                  retry_s: float = 10.0,
                  executor: Callable[[int], list[str]] | None = None) -> int:
    """Run the SuperNode until we are told to stop (exit 0). One that ends by itself is
    started again: at once when it had been up for a while, every ``retry_s`` while it keeps
    failing (e.g. Flower exit code 305: the key is not registered yet, or its previous
    session still counts as online), for at most ``join_timeout`` seconds; then exit 3
    (refused) or 1. A TLS failure (wrong CA) is not retried: exit 1. ``executor``: the
    command (given the SuperNode's pid) of the process that runs its ClientApps (app
    pinning), started beside every SuperNode and stopped with it; its output goes to the
    SuperNode's log."""
    say = Say("m2diff-client", log)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # only possible in the main thread
            previous[sig] = signal.signal(sig, _stop)
    proc = helper = None
    failing_since: float | None = None
    try:
        while True:
            attempt = Attempt()
            proc, pump = start_logged(cmd, supernode_log, sys.stdout, attempt.watch, env=env)
            if executor is not None:
                helper, _ = start_logged(executor(proc.pid), supernode_log, sys.stdout, env=env)
            while proc.poll() is None:
                if attempt.lost:
                    say("the SuperNode lost its connection (a 5xx from the SuperLink; "
                         "Flower does not reconnect); restarting it", err=True)
                    stop_supernode(proc)
                    break
                time.sleep(0.5)
            code = proc.wait()
            pump.join(timeout=5)
            if helper is not None:
                stop_group(helper, grace_s=5)
            now = time.monotonic()
            flower = f" (Flower exit code {attempt.code})" if attempt.code is not None else ""
            log.warning("SuperNode exited with status %s%s after %.0f s", code, flower,
                        now - attempt.started)
            if attempt.tls:
                say("the TLS handshake with the SuperLink failed (check root-certificates=);"
                     " not retrying", err=True)
                return 1
            if now - attempt.started > 60:
                failing_since = now  # it had been connected: its failures start now
            failing_since = failing_since or attempt.started
            if now - failing_since >= join_timeout:
                say(f"the SuperNode keeps ending{flower}; giving up after "
                     f"{join_timeout:.0f} s", err=True)
                return 3 if attempt.code == 305 else (code or 1)
            wait = 0.0 if now - attempt.started > 60 else retry_s
            say(f"the SuperNode ended{flower}; starting it again in {wait:.0f} s"
                 + (" (305: key not registered yet, or its previous session still counts as "
                    "online for up to ~60 s)" if attempt.code == 305 else ""), err=True)
            time.sleep(wait)
    except (_Stop, KeyboardInterrupt):
        log.info("stop requested: stopping the SuperNode")
        if proc is not None:
            stop_supernode(proc)
            log.info("SuperNode stopped (status %s)", proc.returncode)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:
            stop_group(proc)
        if helper is not None:
            stop_group(helper, grace_s=5)
