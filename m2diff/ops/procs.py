"""Child processes: their trees (Linux /proc), stopping them, a free port, waiting for one.

Flower 1.42 detaches ``flower-superexec`` into a session of its own and a SuperLink's
children outlive a crash, so stopping a Flower process means finding its whole family
first; a pid is signalled only while it still runs one of Flower's executables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from m2diff.ops import FlowerError


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(parents.get(child, []))
    return out


def exited_children(pid: int, comm_prefix: str) -> list[int]:
    """Children of ``pid`` whose command name starts with ``comm_prefix`` and that have exited
    but were not reaped (zombies). Flower 1.42's SuperLink starts ``flower-superexec`` (the
    process that starts every ServerApp) and never restarts it: a zombie superexec means no
    run can start any more."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rsplit(")", 1)[1].split()
        if len(fields) > 1 and fields[1] == str(pid) and comm.startswith(comm_prefix) \
                and fields[0] == "Z":
            out.append(int(stat.parent.name))
    return out


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End a child started with start_new_session: its process group and every descendant
    (Flower detaches flower-superexec into a session of its own), SIGTERM then SIGKILL."""
    if proc.poll() is not None:
        return
    family = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _signal_pids(family, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in family):
        time.sleep(0.1)
    _signal_pids([p for p in family if Path(f"/proc/{p}").exists()], signal.SIGKILL)


def is_flower_process(pid: int) -> bool:
    """True when ``pid`` is alive and runs one of Flower's executables (guards against a pid
    reused by something else before we signal it)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(f"{name}" in cmd for name in ("flower-", "flwr-", "/flwr "))


def stop_pids(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM the Flower processes among ``pids`` (left behind when their parent died),
    then SIGKILL what is still there after ``grace_s``."""
    alive = [p for p in pids if is_flower_process(p)]
    _signal_pids(alive, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_flower_process(p) for p in alive):
        time.sleep(0.1)
    _signal_pids([p for p in alive if is_flower_process(p)], signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen | None, what: str, timeout: float = 60,
              poll_s: float = 0.3, log: str = "") -> None:
    """Return once ``host:port`` accepts connections. FlowerError naming ``what`` (and the
    ``log`` to read) when ``proc`` (if given) exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FlowerError(f"{what} exited with status {proc.returncode} at start"
                              + (f"; see {log}" if log else ""))
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host.strip("[]"), port)) == 0:
                return
        time.sleep(poll_s)
    raise FlowerError(f"{what} does not listen on {host}:{port} after {timeout:.0f} s")
