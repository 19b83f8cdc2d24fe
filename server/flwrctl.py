"""Drive Flower's command-line tools: connections, submitting a run, its real outcome.

Used by ``m2diff-server``, ``m2diff simulate`` and the process tests. Facts this relies on
(see /work/shared/FLOWER.md): the ``flwr`` CLI reads connections from
``$FLWR_HOME/config.toml``; ``flwr run`` exits 0 even when the ServerApp fails, so the
outcome comes from ``flwr ls --run-id ID --format json``; run config values are TOML
scalars. Imports no Flower module, so it is cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FINISHED = "finished"
COMPLETED = "finished:completed"


class FlowerError(RuntimeError):
    """A Flower command failed; the message says which and why."""


def tool(name: str) -> str:
    """Path of a Flower executable: beside this Python first (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FlowerError(f"{name} not found (is flwr installed in this environment?)")
    return found


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no update check, no ``uv sync``."""
    env = dict(os.environ)
    # The SuperLink / SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def toml_value(value: Any) -> str:
    """A TOML scalar as Flower's ``key=value`` parser accepts it: a quoted value may not
    contain its own quote character and escapes are not understood, so strings become
    literal strings ('...') or, when they hold a single quote, basic strings ("...")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise FlowerError(f"cannot pass {text!r} through Flower's config syntax (both quote kinds)")


def toml_pairs(values: Mapping[str, Any]) -> str:
    """``{'out-dir': '/x', 'n': 2}`` -> ``out-dir="/x" n=2`` (for --run-config / --node-config)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_connection(home: Path, name: str, address: str, root_certificates: Path | None = None,
                     insecure: bool = False) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (plus ``local``)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {toml_value(name)}", "", f"[superlink.{name}]",
             f"address = {toml_value(address)}"]
    if address != ":local:":
        if insecure:
            lines.append("insecure = true")
        elif root_certificates is not None:
            lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
        else:
            raise FlowerError("a SuperLink connection needs root-certificates or insecure=true")
    if name != "local":
        lines += ["", "[superlink.local]", 'address = ":local:"']
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _json_out(text: str) -> dict[str, Any]:
    """The JSON object in a CLI's stdout (ignores log lines around it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise FlowerError(f"no JSON in output: {text.strip()[-400:]}")
    return json.loads(text[start:end + 1])


@dataclass
class Federation:
    """A SuperLink connection the ``flwr`` CLI can use."""

    home: Path
    connection: str
    env: dict[str, str]

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, app_dir: Path, run_config: Mapping[str, Any],
               federation_config: Mapping[str, Any] | None = None, timeout: float = 300) -> int:
        """``flwr run`` the app; return the run id."""
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        if run_config:
            args += ["--run-config", toml_pairs(run_config)]
        if federation_config:
            args += ["--federation-config", toml_pairs(federation_config)]
        proc = self.flwr(*args, timeout=timeout)
        try:
            data = _json_out(proc.stdout)
        except (FlowerError, ValueError):
            raise FlowerError(f"flwr run failed (exit {proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None
        if not data.get("success", True) or "run-id" not in data:
            raise FlowerError(f"flwr run failed: {data.get('error-message', data)}")
        return int(data["run-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: one dict per SuperNode the SuperLink knows
        (``node-id``, ``status`` online/offline/registered, ``online-at``, ``offline-at``...)."""
        proc = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        data = _json_out(proc.stdout)
        if not data.get("success", True):
            raise FlowerError(f"flwr supernode list: {data.get('error-message', data)}")
        return [dict(n) for n in data.get("nodes") or []]

    def register(self, public_key: Path) -> tuple[int | None, str]:
        """``flwr supernode register KEY``: (node id or None, Flower's message)."""
        proc = self.flwr("supernode", "register", str(public_key), self.connection,
                         "--format", "json", timeout=60)
        try:
            data = _json_out(proc.stdout)
        except (FlowerError, ValueError):
            return None, (proc.stdout + proc.stderr).strip()[-300:]
        if data.get("success", True) and data.get("node-id") is not None:
            return int(data["node-id"]), "registered"
        text = str(data.get("error-message", data)).strip().splitlines()[-1][-300:]
        if "already in use" in text:  # a SuperLink that kept its state (--database)
            return None, "already registered"
        return None, text

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's row of ``flwr ls --run-id`` (keys include ``status``)."""
        proc = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json",
                         timeout=60)
        data = _json_out(proc.stdout)
        if not data.get("success", True):
            raise FlowerError(f"flwr ls: {data.get('error-message', data)}")
        runs = data.get("runs") or []
        if not runs:
            raise FlowerError(f"run {run_id} unknown to the SuperLink: {data}")
        return dict(runs[0])

    def wait(self, run_id: int, timeout: float, stream: bool = True, poll_s: float = 2.0,
             out: Any = None) -> dict[str, Any]:
        """Stream the run's log (``flwr log``) until it ends; return its final ``flwr ls`` row.

        Raises FlowerError when it does not end within ``timeout`` seconds.
        """
        logger = None
        if stream:
            logger = subprocess.Popen([tool("flwr"), "log", str(run_id), self.connection,
                                       "--stream"], env=self.env, stdout=out or sys.stdout,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                row = self.status(run_id)
                if str(row.get("status", "")).startswith(FINISHED):
                    if logger is not None:
                        # let the log stream drain what is left
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            logger.wait(timeout=10)
                    return row
                if time.monotonic() > deadline:
                    self.flwr("stop", str(run_id), self.connection, timeout=60)
                    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s; stopped")
                time.sleep(poll_s)
        finally:
            if logger is not None and logger.poll() is None:
                stop_group(logger)


def run_outcome(row: Mapping[str, Any]) -> tuple[bool, str]:
    """(succeeded, one-line description) of a ``flwr ls`` row."""
    status = str(row.get("status", "?"))
    details = str(row.get("status-details", "") or "")
    details = "" if details == "N/A" else details
    return status == COMPLETED, f"{status}{': ' + details if details else ''}"


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


# -- log files ------------------------------------------------------------------------------
# Our own lines and every Flower child's output go to size-rotated files (RotatingFileHandler:
# NAME.log, NAME.log.1 .. NAME.log.BACKUPS), the children's through a reader thread that
# also echoes them to the console unchanged.

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_FORMAT = "%(asctime)s %(message)s"


@dataclass(frozen=True)
class LogSettings:
    """Where the log files go and how they rotate."""

    folder: Path
    max_bytes: int = 10 * 2**20
    backups: int = 5

    @classmethod
    def from_args(cls, folder: Path, max_mb: str | None, backups: str | None) -> LogSettings:
        """From ``log-max-mb=`` / ``log-backups=`` words (ValueError on nonsense)."""
        max_bytes = int(float(max_mb) * 2**20) if max_mb not in (None, "") else cls.max_bytes
        count = int(backups) if backups not in (None, "") else cls.backups
        if max_bytes < 1 or count < 1:
            raise ValueError("log-max-mb and log-backups must be positive")
        return cls(folder, max_bytes, count)


def file_logger(settings: LogSettings, name: str, fmt: str = LOG_FORMAT) -> logging.Logger:
    """A logger writing only to ``settings.folder/NAME.log``, rotated by size.

    Calling it again for the same file replaces the handler (no duplicated lines)."""
    settings.folder.mkdir(parents=True, exist_ok=True)
    path = (settings.folder / f"{name}.log").resolve()
    logger = logging.getLogger(f"m2diff.logfile.{path}")
    close_logger(logger)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=settings.max_bytes,
                                                   backupCount=settings.backups,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def pump(stream: IO[bytes], logger: logging.Logger, echo: IO[str] | None,
         watch: Callable[[str], None] | None = None) -> threading.Thread:
    """Copy a child's output line by line into ``logger`` (colour codes stripped) and, raw,
    to ``echo``; ``watch`` sees every stripped line. Returns the (daemon) thread, which ends
    at the child's EOF."""

    def _run() -> None:
        with contextlib.suppress(ValueError, OSError):
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if echo is not None:
                    with contextlib.suppress(ValueError, OSError):
                        echo.write(line)
                        echo.flush()
                text = ANSI.sub("", line).rstrip()
                if text:
                    logger.info("%s", text)
                    if watch is not None:
                        watch(text)

    thread = threading.Thread(target=_run, name=f"pump-{logger.name}", daemon=True)
    thread.start()
    return thread


def start_logged(cmd: list[str], logger: logging.Logger, echo: IO[str] | None,
                 watch: Callable[[str], None] | None = None,
                 **popen: Any) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` in a session of its own with stdout+stderr going through ``pump``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)
    assert proc.stdout is not None
    return proc, pump(proc.stdout, logger, echo, watch)


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
