"""Drive Flower's command-line tools: connections, submitting a run, its real outcome.

Used by ``m2diff-server``, ``m2diff-client``, ``m2diff simulate`` and the process tests.
Facts of Flower 1.42 this relies on: the ``flwr`` CLI reads connections from
``$FLWR_HOME/config.toml``; ``flwr run`` exits 0 even when the ServerApp fails, so the
outcome comes from ``flwr ls --run-id ID --format json``; run config values are TOML
scalars. Imports no Flower module, so it is cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2diff.ops import FlowerError
from m2diff.ops.procs import stop_group

FINISHED = "finished"
COMPLETED = "finished:completed"


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

    def close(self) -> None:
        """Remove the private FLWR_HOME (``private_federation``)."""
        shutil.rmtree(self.home, ignore_errors=True)

    def stop(self, run_id: int) -> subprocess.CompletedProcess[str]:
        """``flwr stop RUN_ID``."""
        return self.flwr("stop", str(run_id), self.connection, timeout=60)

    def log_command(self, run_id: int) -> list[str]:
        """``flwr log RUN_ID --stream``: the run's log until it ends."""
        return [tool("flwr"), "log", str(run_id), self.connection, "--stream"]

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
             out: Any = None, stream_poll_s: float = 30.0) -> dict[str, Any]:
        """Stream the run's log (``flwr log``) until it ends; return its final ``flwr ls`` row.

        Every ``flwr ls`` is a fresh Python process (~1 s of CPU; on 2 cores, polling every
        2 s took half a core from the sites' training). ``flwr log`` ends when the run does, so
        while it streams the status is asked only every ``stream_poll_s`` (in case the stream
        died) and at once when the stream ends; without a stream, every ``poll_s``.
        Raises FlowerError when it does not end within ``timeout`` seconds.
        """
        logger = None
        if stream:
            logger = subprocess.Popen(self.log_command(run_id), env=self.env,
                                      stdout=out or sys.stdout, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + timeout
        next_status = 0.0
        try:
            while True:
                streaming = logger is not None and logger.poll() is None
                if time.monotonic() >= next_status or not streaming:
                    row = self.status(run_id)
                    if str(row.get("status", "")).startswith(FINISHED):
                        if logger is not None:
                            # let the log stream drain what is left
                            with contextlib.suppress(subprocess.TimeoutExpired):
                                logger.wait(timeout=10)
                        return row
                    next_status = time.monotonic() + (stream_poll_s if streaming else poll_s)
                if time.monotonic() > deadline:
                    self.stop(run_id)
                    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s; stopped")
                time.sleep(0.5 if streaming else poll_s)
        finally:
            if logger is not None and logger.poll() is None:
                stop_group(logger)


def private_federation(connection: str, address: str, root_certificates: Path | None = None,
                       insecure: bool = False, extra: Mapping[str, str] | None = None
                       ) -> Federation:
    """A ``Federation`` with a private FLWR_HOME in a new temporary folder holding one
    connection; ``close()`` removes it. The folder is outside every app folder on purpose:
    Flower installs the app bundle there, and a copy of the sources inside a folder of the
    app would end up in the next bundle."""
    home = Path(tempfile.mkdtemp(prefix="m2diff-flwr-"))
    try:
        write_connection(home, connection, address, root_certificates, insecure=insecure)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    return Federation(home, connection, flower_env(home, extra))


def run_outcome(row: Mapping[str, Any]) -> tuple[bool, str]:
    """(succeeded, one-line description) of a ``flwr ls`` row."""
    status = str(row.get("status", "?"))
    details = str(row.get("status-details", "") or "")
    details = "" if details == "N/A" else details
    return status == COMPLETED, f"{status}{': ' + details if details else ''}"
