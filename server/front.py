"""The coordinator's public port: an nginx TLS front that passes only what a SuperNode uses.

Flower 1.42's ``flower-superlink`` serves the Fleet API (what SuperNodes call), the Control
API (``flwr run / ls / stop``, ``flwr supernode register``) and the ServerApp runtime API on
ONE port, and without Flower's enterprise login plugin the Control API trusts any caller
that completes TLS. So the SuperLink listens on 127.0.0.1 only, and what the hospitals reach
is this front: nginx (from the OS packages) terminating TLS with the SuperLink's own
certificate and forwarding

* ``POST /v1/fleet/<route>`` for exactly the routes of ``FLEET_ROUTES`` (the calls of
  Flower's ``FleetHttpClient``, which the SuperNode uses; SuperNode authentication is a
  signed header on each of them and passes through unchanged), and
* ``GET|HEAD /health``,

to the loopback SuperLink over TLS (verified against the federation CA); every other path
and method is answered 404/403 by nginx itself. Requests larger than ``max_body_bytes`` (a
few times the model, ``request_cap``) get 413 before they reach Flower. A 500 from the
SuperLink is passed on as 503: Flower 1.42's SuperNode retries 502/503/504 but gives up its
main loop on a 500 and hangs (seen under load, when SQLite reported "database is locked").

``Front`` writes ``OUT/front/nginx.conf`` at every start (the state folder, never the
system's nginx configuration), runs ``nginx -e stderr -p OUT/front -c nginx.conf`` in the
foreground with its error log and the access log of refused or failed requests (status
400 and up) on stdout/stderr (m2diff-server pumps them into a rotated ``front.log``), and is
restarted by m2diff-server when it dies. Nothing is
buffered to disk (``proxy_request_buffering off``, ``proxy_buffering off``): with nginx
started as root its workers run as an unprivileged user that need not reach the out-dir.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2diff.ops import FlowerError
from m2diff.ops.logs import start_logged
from m2diff.ops.procs import stop_group, wait_port

# POST /v1/fleet/<route>: Flower 1.42's FleetHttpClient (flwr/supernode/fleet_http_client.py),
# which is also every route of the SuperLink's fleet router. tests/server/test_front.py fails
# when an installed Flower's client calls a route that is not here (or serves a new one).
FLEET_PREFIX = "/v1/fleet/"
FLEET_ROUTES = (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
)
HEALTH_PATH = "/health"
FOLDER = "front"          # under the out-dir: nginx.conf, nginx.pid, tmp/
CONF_FILE = "nginx.conf"
DEFAULT_CAP_FACTOR = 4    # request cap = this x the model's bytes (float32 weights) ...
MIN_CAP_BYTES = 4 * 2**20  # ... but at least 4 MiB (heartbeats and control messages are tiny)
TIMEOUT_S = 300           # per read/write on either side; model uploads of a slow site


def model_bytes(model_cfg: Any) -> int:
    """Bytes of the state dict ``build_model(model_cfg)`` makes, computed on torch's meta
    device (no memory is allocated, so a huge configured model costs nothing here)."""
    from m2diff.checkpoint import model_state_bytes

    return model_state_bytes(model_cfg)[1]


def request_cap(model_cfg: Any, max_mb: str | float | None = None) -> int:
    """The front's request-size cap in bytes: ``max_mb`` MiB when given, else
    ``DEFAULT_CAP_FACTOR`` x the model's bytes (at least ``MIN_CAP_BYTES``). A SuperNode's
    largest request is one push of (a part of) its model update."""
    if max_mb not in (None, ""):
        value = float(max_mb)  # type: ignore[arg-type]
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"front-max-mb={max_mb} must be a positive number of MiB")
        return int(value * 2**20)
    return max(MIN_CAP_BYTES, DEFAULT_CAP_FACTOR * model_bytes(model_cfg))


@dataclass(frozen=True)
class FrontSettings:
    """What the front listens on and forwards to.

    ``tls`` is (ca, cert, key): the front serves ``cert``/``key`` and verifies the loopback
    SuperLink against ``ca`` (the SuperLink's certificate must name ``upstream_name``);
    None: plain HTTP on both sides (``insecure=true``, tests only)."""

    host: str
    port: int
    link_port: int
    folder: Path
    max_body_bytes: int
    tls: tuple[Path, Path, Path] | None = None
    upstream_name: str = "localhost"


def _quote(value: object) -> str:
    """An nginx string argument (paths may hold spaces)."""
    text = str(value)
    if any(c in text for c in "\"\\\n;{}$"):
        raise ValueError(f"cannot put {text!r} into the nginx configuration")
    return f'"{text}"'


def render_config(s: FrontSettings) -> str:
    """The complete nginx.conf of the front."""
    tmp = s.folder / "tmp"
    scheme = "https" if s.tls else "http"
    lines = [
        "# Written by m2diff-server at every start (server/front.py); edits are overwritten.",
        "daemon off;",
        "worker_processes 1;",
        f"pid {_quote(s.folder / 'nginx.pid')};",
        "error_log stderr warn;",
        "events { worker_connections 1024; }",
        "http {",
        "  log_format m2diff '$remote_addr \"$request\" $status upstream=$upstream_status "
        "in=$request_length out=$bytes_sent ${request_time}s';",
        # Only what was refused or failed (heartbeats and pulls every few seconds would drown it).
        "  map $status $m2diff_refused { ~^[23] 0; default 1; }",
        "  access_log /dev/stdout m2diff if=$m2diff_refused;",
        "  server_tokens off;",
        *(f"  {kind}_temp_path {_quote(tmp / kind)};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"  client_max_body_size {s.max_body_bytes};",
        "  client_body_buffer_size 1m;",
        "  client_header_timeout 30s;",
        "  client_body_timeout 60s;",
        f"  send_timeout {TIMEOUT_S}s;",
        "  proxy_request_buffering off;",
        "  proxy_buffering off;",
        "  proxy_http_version 1.1;",
        '  proxy_set_header Connection "";',
        f"  proxy_read_timeout {TIMEOUT_S}s;",
        f"  proxy_send_timeout {TIMEOUT_S}s;",
        "  upstream superlink {",
        f"    server 127.0.0.1:{s.link_port};",
        "    keepalive 8;",
        "  }",
        "  server {",
        f"    listen {s.host}:{s.port}{' ssl' if s.tls else ''};",
    ]
    if s.tls:
        ca, cert, key = s.tls
        lines += [
            f"    ssl_certificate {_quote(cert)};",
            f"    ssl_certificate_key {_quote(key)};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            f"    proxy_ssl_trusted_certificate {_quote(ca)};",
            "    proxy_ssl_verify on;",
            "    proxy_ssl_verify_depth 2;",
            f"    proxy_ssl_name {s.upstream_name};",
            "    proxy_ssl_session_reuse on;",
        ]
    for route in FLEET_ROUTES:
        path = FLEET_PREFIX + route
        lines.append(f"    location = {path} {{ limit_except POST {{ deny all; }} "
                     f"proxy_pass {scheme}://superlink{path}; }}")
    lines += [
        f"    location = {HEALTH_PATH} {{ limit_except GET {{ deny all; }} "
        f"proxy_pass {scheme}://superlink{HEALTH_PATH}; }}",
        "    location / { return 404; }",
        # A 500 from the SuperLink (e.g. SQLite's 'database is locked' under load) ends a
        # Flower 1.42 SuperNode's main loop and leaves the process hanging; 503 is one it
        # retries, as it does while the SuperLink restarts. Other statuses pass unchanged.
        "    proxy_intercept_errors on;",
        "    error_page 500 = @busy;",
        "    location @busy { return 503; }",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nginx_binary() -> str:
    """Path of nginx; a FlowerError saying how to install it when there is none."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FlowerError("nginx not found: m2diff-server serves the sites through an nginx TLS "
                      "front (Debian/Ubuntu: apt-get install nginx; the coordinator image has it)")


class Front:
    """The nginx process of one m2diff-server: configure, start, watch, restart, stop."""

    def __init__(self, settings: FrontSettings, logger: logging.Logger) -> None:
        self.settings, self.logger = settings, logger
        self.proc: subprocess.Popen | None = None
        self.binary = nginx_binary()

    @property
    def conf(self) -> Path:
        return self.settings.folder / CONF_FILE

    def _cmd(self, *extra: str) -> list[str]:
        return [self.binary, "-e", "stderr", "-p", str(self.settings.folder),
                "-c", str(self.conf), *extra]

    def write(self) -> Path:
        """(Re)write nginx.conf and check it with ``nginx -t``."""
        from m2diff.report import write_text

        folder = self.settings.folder
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        write_text(self.conf, render_config(self.settings))
        check = subprocess.run(self._cmd("-t", "-q"), capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise FlowerError(f"nginx rejects {self.conf}: {(check.stdout + check.stderr).strip()[-600:]}")
        return self.conf

    def stop_leftover(self) -> int | None:
        """The nginx of an earlier m2diff-server on this out-dir that was killed without
        cleaning up still holds the port: stop it (only if it runs our nginx.conf)."""
        pid_file = self.settings.folder / "nginx.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if not any(b"nginx" in w for w in cmd) or str(self.conf).encode() not in cmd:
            return None
        with contextlib.suppress(ProcessLookupError):
            import os

            os.kill(pid, signal.SIGQUIT)  # graceful: the master ends its workers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        return pid

    def reap(self) -> None:
        """End what is left of an nginx that died: its workers outlive a killed master (they
        are in its process group, which was started as a session of its own) and would keep
        the port."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            stop_group(self.proc, grace_s=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            import os

            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def start(self, wait_s: float = 20.0) -> None:
        """Write the config and start nginx; return once it accepts connections."""
        self.reap()
        self.write()
        self.proc, _ = start_logged(self._cmd(), self.logger, None)
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "[::]") else self.settings.host
        wait_port(host, self.settings.port, self.proc, "nginx (the TLS front)", wait_s, poll_s=0.1,
                  log="front.log")

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def stop(self) -> None:
        self.reap()


def describe(s: FrontSettings) -> str:
    """One line for the console: what is public and what is not."""
    return (f"{'TLS' if s.tls else 'plain HTTP'} front (nginx) on {s.host}:{s.port} -> SuperLink "
            f"127.0.0.1:{s.link_port}; public: POST {FLEET_PREFIX}{{{len(FLEET_ROUTES)} Fleet routes}}, "
            f"GET {HEALTH_PATH}; requests up to {s.max_body_bytes / 2**20:.1f} MiB")


def settings_from(args: Mapping[str, str], out: Path, link_port: int, max_body_bytes: int,
                  tls: tuple[Path, Path, Path] | None) -> FrontSettings:
    """The front of ``m2diff-server``'s ``host=`` / ``port=``."""
    return FrontSettings(host=str(args.get("host", "0.0.0.0")), port=int(args.get("port", 8000)),
                         link_port=link_port, folder=out / FOLDER, max_body_bytes=max_body_bytes,
                         tls=tls)
