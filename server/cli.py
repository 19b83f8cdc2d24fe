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
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m2diff.config import ConfigError, compose, resolve_path
from server.flwrctl import (
    FINISHED,
    Federation,
    FlowerError,
    LogSettings,
    close_logger,
    descendants,
    exited_children,
    file_logger,
    flower_env,
    is_flower_process,
    run_outcome,
    start_logged,
    stop_group,
    stop_pids,
    tool,
    write_connection,
)
from server.front import Front, describe, request_cap, settings_from
from server.runstate import clock, read_rows, read_state, truthy, write_state
from server.status import status

KEYS = {"ca", "cert", "key", "insecure", "auth", "auth-keys", "host", "port", "link-port",
        "front-max-mb", "address", "out", "database", "app", "restarts", "log-dir", "log-max-mb",
        "log-backups"}
LOOPBACK_NAMES = ("IP:127.0.0.1", "DNS:localhost")  # what the certificate must also name
APP_DIR = Path(__file__).resolve().parents[1]
DATABASE_FILE = "superlink-state.db"
IN_MEMORY = ("memory", ":memory:", "none")
STATUS_EVERY_S = 10.0   # flwr ls (each call is a Python start, ~1 s CPU)
NODES_EVERY_S = 30.0    # flwr supernode list


def parse_words(words: Sequence[str], keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` words into this command's keys and Hydra overrides.

    A key may be spelled with ``_`` or ``-`` (``log_dir=`` is ``log-dir=``)."""
    args: dict[str, str] = {}
    overrides: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"'{word}' is not key=value")
        if key.replace("_", "-") in keys:
            args[key.replace("_", "-")] = value
        else:
            overrides.append(word)
    return args, overrides


def database_path(args: dict[str, str], out: Path) -> Path | None:
    """The SuperLink's state file (None: in memory)."""
    value = args.get("database")
    if value is not None and value.lower() in IN_MEMORY:
        return None
    return resolve_path(value) if value else out / DATABASE_FILE


def auth_enabled(args: dict[str, str]) -> bool:
    """``auth=`` (default true). ``insecure=true`` needs an explicit ``auth=false``: Flower's
    SuperNode authentication needs TLS."""
    auth = truthy(args.get("auth", "true"))
    if truthy(args.get("insecure")) and auth:
        raise ConfigError("insecure=true needs auth=false (SuperNode auth needs TLS): give ca=, "
                          "cert=, key= instead, or add auth=false for a test")
    return auth


def tls_files(args: dict[str, str]) -> tuple[Path, Path, Path] | None:
    """(ca, cert, key) of ``ca=`` / ``cert=`` / ``key=``; None with ``insecure=true``. The
    certificate must also name the loopback SuperLink (``check_loopback_names``)."""
    if truthy(args.get("insecure")):
        return None
    files = {k: resolve_path(args.get(k)) for k in ("ca", "cert", "key")}
    missing = [k for k, v in files.items() if v is None or not v.is_file()]
    if missing:
        raise ConfigError(f"TLS needs existing files for {', '.join(k + '=' for k in missing)} "
                          "(deploy/make-certs.sh makes them; insecure=true for plain HTTP)")
    ca, cert, key = (files[k] for k in ("ca", "cert", "key"))
    assert ca is not None and cert is not None and key is not None
    check_loopback_names(cert)
    return ca, cert, key


def check_loopback_names(cert: Path) -> None:
    """The SuperLink listens on 127.0.0.1 with this certificate: this command's flwr CLI and
    the ServerApp dial it as 127.0.0.1 (IP SAN), the front verifies it as ``localhost``
    (nginx checks DNS names only). ConfigError naming what is missing."""
    from cryptography import x509

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(f"cert={cert}: not a PEM certificate with subjectAltNames ({exc})") from None
    names = {f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)}
    names |= {f"DNS:{dns}" for dns in sans.get_values_for_type(x509.DNSName)}
    missing = [n for n in LOOPBACK_NAMES if n not in names]
    if missing:
        raise ConfigError(f"cert={cert} does not name {' and '.join(missing)}: the SuperLink listens "
                          "on loopback behind the TLS front, which dials it by those names. Re-issue "
                          "it with deploy/make-certs.sh (it adds them), keeping the CA")


def superlink_command(args: dict[str, str], port: int, database: Path | None = None) -> list[str]:
    """The SuperLink command line (Flower's, via m2diff-flower-superlink): loopback only (``port`` is the loopback port; the
    public port is the front's)."""
    cmd = [tool("m2diff-flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    auth = auth_enabled(args)
    tls = tls_files(args)
    if tls is None:
        cmd.append("--insecure")
    else:
        ca, cert, key = tls
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def loopback_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LOST_SERVERAPP = "No heartbeat received from the task"
# A ServerApp ended by its own SuperLink answering 5xx on the runtime API (seen under load:
# SQLite's "database is locked" after its 5 s busy timeout); Flower's Grid does not retry it.
SUPERLINK_5XX = re.compile(r"ServerApp failed with exception: Server error '5\d\d [^']*' "
                           r"for url '[^']*/v1/runtime/")


def lost_serverapp(row: dict[str, Any]) -> bool:
    """A run that failed because its ServerApp was lost, not because the app raised: the
    process vanished without reporting (killed, out of memory) or its own SuperLink answered
    a runtime call with a 5xx. Worth resuming from the checkpoint. Any other ServerApp
    exception (a bad setting, no site trained, ...) is not."""
    details = str(row.get("status-details", "") or "").strip()
    return str(row.get("status")) == "finished:failed" and (
        details == LOST_SERVERAPP or bool(SUPERLINK_5XX.match(details)))


def log_settings(args: dict[str, str], default: Path) -> LogSettings:
    folder = resolve_path(args.get("log-dir")) or default
    try:
        return LogSettings.from_args(folder, args.get("log-max-mb"), args.get("log-backups"))
    except ValueError as exc:
        raise ConfigError(f"log-max-mb= / log-backups=: {exc}") from None


def print_table(out: Path) -> None:
    """The last round's per-site, per-cohort table from out/rounds.json."""
    from m2diff.fedutil import table_columns, table_rows
    from m2diff.report import print_table as rich_table

    path = out / "rounds.json"
    if not path.is_file():
        print(f"m2diff-server: no {path}", file=sys.stderr)
        return
    rows = read_rows(out)
    if rows:
        last = max(int(r["round"]) for r in rows)
        table = table_rows([r for r in rows if int(r["round"]) == last], "federated")
        rich_table(table, f"Held-out test subjects after round {last} ({out})", table_columns(table))


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


class Say:
    """This command's own lines: to the console (``m2diff-server: ...``) and, with a
    timestamp, to LOG_DIR/m2diff-server.log."""

    def __init__(self, logger: logging.Logger | None) -> None:
        self.logger = logger

    def __call__(self, text: str, err: bool = False, style: str | None = None) -> None:
        if style and not err:
            from rich.console import Console
            from rich.text import Text

            Console(file=sys.stdout, highlight=False, soft_wrap=True).print(
                Text("m2diff-server: ", style="bold") + Text(text, style=style))
        else:
            print(f"m2diff-server: {text}", file=sys.stderr if err else sys.stdout, flush=True)
        if self.logger is not None:
            self.logger.log(logging.WARNING if err else logging.INFO, "%s", text)


class Progress:
    """One line per round that appears in out/rounds.json: round r/N, the sites that answered,
    the round's and the whole command's time."""

    def __init__(self, out: Path, last_round: int, say: Callable[..., None]) -> None:
        self.out, self.last_round, self.say = out, last_round, say
        self.t0 = time.monotonic()
        self.stamp: float | None = None
        rows = read_rows(out)
        self.seen = max((int(r["round"]) for r in rows), default=0)

    def rebase(self) -> None:
        """After a resubmission the ServerApp drops rows after its checkpoint: report again
        from there."""
        self.seen = min(self.seen, max((int(r["round"]) for r in read_rows(self.out)), default=0))
        self.stamp = None

    def check(self) -> None:
        path = self.out / "rounds.json"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return
        if stamp == self.stamp:
            return
        self.stamp = stamp
        rows = read_rows(self.out)
        for rnd in sorted({int(r["round"]) for r in rows if int(r["round"]) > self.seen}):
            these = [r for r in rows if int(r["round"]) == rnd]
            sites = sorted({str(r["site"]) for r in these})
            trained = sorted({str(r["site"]) for r in these if "train_loss" in r})
            secs = float(these[0].get("round_train_s", 0) or 0) + \
                float(these[0].get("round_evaluate_s", 0) or 0)
            extra = "" if trained == sites else f"; trained: {', '.join(trained) or 'none'}"
            self.say(f"round {rnd}/{self.last_round} done in {secs:.0f} s: {len(sites)} site(s) "
                     f"answered ({', '.join(sites)}{extra}); elapsed {clock(time.monotonic() - self.t0)}",
                     style="green")
            self.seen = rnd


class Coordinator:
    """The SuperLink process, its log files and the run it serves, restarted when it dies."""

    def __init__(self, args: dict[str, str], overrides: list[str], out: Path,
                 logs: LogSettings, say: Say) -> None:
        self.args, self.overrides, self.out, self.logs, self.say = args, overrides, out, logs, say
        self.cfg = compose(overrides)
        self.port = int(args.get("port", 8000))  # the front's, public
        old = read_state(out)
        self.link_port = int(args.get("link-port") or 0) or loopback_port()
        self.database = database_path(args, out)
        self.cmd = superlink_command(args, self.link_port, self.database)
        self.insecure = truthy(args.get("insecure"))
        self.auth = auth_enabled(args)
        tls = tls_files(args)
        try:
            cap = request_cap(self.cfg.model, args.get("front-max-mb"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.front_settings = settings_from(args, out, self.link_port, cap, tls)
        # A private FLWR_HOME outside out-dir: Flower installs the app bundle there, and a copy
        # of the sources inside a folder of the app would end up in the next bundle.
        self.home = Path(tempfile.mkdtemp(prefix="m2diff-flwr-"))
        self.address = args.get("address") or f"127.0.0.1:{self.link_port}"
        self.ca = resolve_path(args.get("ca"))
        write_connection(self.home, "m2diff", self.address, self.ca, insecure=self.insecure)
        self.env = flower_env(self.home)
        self.ctl = Federation(self.home, "m2diff", self.env)
        self.link_log = file_logger(logs, "superlink")
        self.run_log = file_logger(logs, "run")
        self.front = Front(self.front_settings, file_logger(logs, "front"))
        self.link: subprocess.Popen | None = None
        self.family: list[int] = []
        self.streamer: subprocess.Popen | None = None
        self.restarts = 0
        self.state: dict[str, Any] = {
            "pid": None, "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "address": self.address, "ca": str(self.ca) if self.ca else None,
            "insecure": self.insecure, "auth": self.auth, "rounds": int(self.cfg.fl.rounds),
            "front": f"{self.front_settings.host}:{self.port}", "superlink_port": self.link_port,
            "front_max_bytes": cap, "database": str(self.database) if self.database else None,
            "log_dir": str(logs.folder), "run_id": None, "runs": [], "status": "starting",
            "superlink_restarts": 0, "front_restarts": 0,
            # run id -> sha256 of the app bundle (FAB) it runs, as the SuperLink computed it
            "fab_sha256": {},
            # node id -> site name, from the registered keys (kept while the database is)
            "nodes": dict(old.get("nodes") or {}) if self.database else {},
        }
        self.previous_run = old.get("run_id") if self.database else None
        self.previous_link = old.get("superlink_pid")
        self.previous_link_port = old.get("superlink_port")

    # -- the SuperLink ----------------------------------------------------------------------
    def stop_leftover_link(self) -> None:
        """The SuperLink of an earlier m2diff-server on this out-dir that was killed without
        cleaning up (kill -9) still holds the port and the database: stop it."""
        pid = self.previous_link
        if not pid or not is_flower_process(int(pid)):
            return
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
        ours = {str(p).encode() for p in (self.database, self.previous_link_port, self.link_port) if p}
        if b"flower-superlink" not in b" ".join(cmdline) or not ours & set(cmdline):
            return
        self.say(f"stopping the SuperLink (pid {pid}) an earlier m2diff-server left running", err=True)
        stop_pids([*descendants(int(pid)), int(pid)], grace_s=10)

    def start_link(self) -> None:
        self.link, _ = start_logged(self.cmd, self.link_log, None, cwd=self.out, env=self.env)
        self.save(superlink_pid=self.link.pid)
        _wait_port("127.0.0.1", self.link_port, self.link)
        self.family = []
        self.say(f"SuperLink on 127.0.0.1:{self.link_port}, loopback only "
                 f"({'plain HTTP' if self.insecure else 'TLS'}"
                 f"{', SuperNode auth' if self.auth else ''}; state {self.database or 'in memory'}); "
                 f"logs in {self.logs.folder}")
        if self.auth and self.args.get("auth-keys"):
            self.register_keys(Path(str(resolve_path(self.args["auth-keys"]))))

    def start_front(self) -> None:
        """The public port: nginx passing only the SuperNodes' Fleet routes (server/front.py)."""
        leftover = self.front.stop_leftover()
        if leftover:
            self.say(f"stopped the TLS front (nginx pid {leftover}) an earlier m2diff-server left "
                     "running", err=True)
        self.front.start()
        self.save(front_pid=self.front.proc.pid if self.front.proc else None)
        self.say(describe(self.front_settings))

    def count_restart(self, what: str, code: int | None, counter: str) -> bool:
        """Count one restart of ``what`` (the front and the SuperLink share the ``restarts=``
        budget) in ``state[counter]``, say so; True while within the budget."""
        self.restarts += 1
        self.state[counter] = int(self.state[counter]) + 1
        limit = int(self.args.get("restarts", 3))
        within = self.restarts <= limit
        self.say(f"{what} exited (status {code}); {'restarting it' if within else 'giving up'} "
                 f"({self.restarts}/{limit} restarts)", err=True)
        return within

    def restart_front(self) -> None:
        if not self.count_restart("the TLS front (nginx)", self.front.returncode, "front_restarts"):
            raise FlowerError(f"the front died; {self.restarts} restarts in all; see "
                              f"{self.logs.folder / 'front.log'}")
        self.start_front()

    def register_keys(self, folder: Path) -> None:
        nodes = self.state["nodes"]
        for pub in sorted(folder.glob("*.pub")):
            site = pub.name.removesuffix(".pub").removesuffix(".key")
            node_id, text = self.ctl.register(pub)
            if node_id is not None:
                nodes = {k: v for k, v in nodes.items() if v != site}
                nodes[str(node_id)] = site
            known = [k for k, v in nodes.items() if v == site]
            self.say(f"register {pub.name}: {text}"
                     f"{f' (node {known[0]})' if known else ''}")
        self.state["nodes"] = nodes
        self.save()

    def link_died(self) -> bool:
        """True when the SuperLink exited, or is up but cannot start a ServerApp any more (its
        flower-superexec exited, e.g. after a 500 from the SuperLink under load: Flower does
        not restart it): then it is stopped here, to be restarted like a dead one."""
        assert self.link is not None
        if self.link.poll() is None:
            # who belongs to it, while it can still be asked: its children outlive a crash
            self.family = descendants(self.link.pid) or self.family
            if not exited_children(self.link.pid, "flower-superexe"):
                return False
            self.say("the SuperLink's flower-superexec exited (Flower does not start it again, "
                     "and no ServerApp can start without it): stopping the SuperLink", err=True)
            stop_group(self.link, grace_s=10)
        return True

    def restart_link(self) -> None:
        assert self.link is not None
        within = self.count_restart("the SuperLink", self.link.returncode, "superlink_restarts")
        self.stop_streamer()
        stop_pids(self.family)  # its superexec and ServerApp, orphaned
        if not within:
            raise FlowerError(f"the SuperLink died {self.restarts} times; see "
                              f"{self.logs.folder / 'superlink.log'}")
        self.start_link()

    # -- the run ----------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.out, self.state)

    def submit(self, resume: bool = False) -> int:
        from server.strategy import format_registered

        overrides = list(self.overrides) + (["fl.resume=true"] if resume else [])
        app_dir = Path(self.args.get("app") or APP_DIR)
        run_id = self.ctl.submit(app_dir, {
            "out-dir": str(self.out), "overrides": " ".join(overrides),
            "registered-sites": format_registered(self.state["nodes"]) if self.auth else ""})
        self.save(run_id=run_id, runs=[*self.state["runs"], run_id], status="running")
        self.record_app_hash(run_id)
        self.start_streamer(run_id)
        return run_id

    def record_app_hash(self, run_id: int) -> str | None:
        """Print and record the sha256 of the FAB the SuperLink stored for ``run_id`` (the
        ``fab-hash`` of ``flwr ls``: Flower's ``Fab.hash_str``, sha256 of the bundle's bytes,
        which is what every SuperNode is sent and what hospitals pin; server/fabhash.py
        builds the same bytes locally)."""
        row = self.run_status(run_id, tries=3) or {}
        digest = str(row.get("fab-hash") or "")
        if len(digest) != 64:
            self.say(f"run {run_id}: the SuperLink did not report the app's FAB sha256", err=True)
            return None
        self.save(fab_sha256={**self.state["fab_sha256"], str(run_id): digest}, app_sha256=digest)
        self.say(f"run {run_id}: app (FAB) sha256 {digest}")
        return digest

    def start_streamer(self, run_id: int) -> None:
        self.stop_streamer()
        self.streamer, _ = start_logged([tool("flwr"), "log", str(run_id), "m2diff", "--stream"],
                                        self.run_log, sys.stdout, env=self.env)

    def stop_streamer(self) -> None:
        if self.streamer is not None:
            stop_group(self.streamer, grace_s=2)
            self.streamer = None

    def run_status(self, run_id: int, tries: int = 1) -> dict[str, Any] | None:
        """The run's ``flwr ls`` row, None when the SuperLink did not answer."""
        for attempt in range(tries):
            try:
                return self.ctl.status(run_id)
            except (FlowerError, ValueError, subprocess.TimeoutExpired):
                if attempt + 1 < tries:
                    time.sleep(2)
        return None

    def stop_stale_run(self) -> None:
        """A run of an earlier m2diff-server that the database still calls active (the
        command was killed with its SuperLink): stop it, so that only our run talks to the sites."""
        if not self.previous_run:
            return
        row = self.run_status(int(self.previous_run), tries=2)
        if row is not None and not str(row.get("status", "")).startswith(FINISHED):
            self.ctl.flwr("stop", str(self.previous_run), "m2diff", timeout=60)
            self.say(f"stopped run {self.previous_run} left {row.get('status')} by an earlier start")

    def watch_nodes(self, seen: dict[str, str]) -> dict[str, str]:
        try:
            nodes = self.ctl.nodes()
        except (FlowerError, ValueError, subprocess.TimeoutExpired):
            return seen
        now = {str(n.get("node-id")): str(n.get("status")) for n in nodes}
        if {k for k, v in now.items() if v == "online"} != {k for k, v in seen.items() if v == "online"}:
            names = [self.state["nodes"].get(k, f"node {k}") for k, v in sorted(now.items())
                     if v == "online"]
            self.say(f"SuperNodes online: {len(names)} ({', '.join(names) or 'none'})")
        return now

    def supervise(self, run_id: int, progress: Progress) -> dict[str, Any]:
        """Wait for the run to finish; restart a dead SuperLink and resubmit the lost run."""
        budget = float(self.cfg.fl.rounds) * 2 * float(self.cfg.fl.round_timeout) + 600
        deadline = time.monotonic() + budget
        next_status = time.monotonic() + STATUS_EVERY_S
        next_nodes = time.monotonic()
        nodes: dict[str, str] = {}
        while True:
            if self.front.died():
                self.restart_front()
            if self.link_died():
                self.restart_link()
                row = self.run_status(run_id, tries=5)
                status = str((row or {}).get("status", "unknown"))
                if status == "finished:completed":
                    return row or {}
                if not status.startswith(FINISHED):
                    # Its ServerApp's token died with the old SuperLink (Flower 1.42 keeps
                    # runs and nodes in the database, not the tokens): it cannot go on.
                    self.ctl.flwr("stop", str(run_id), "m2diff", timeout=60)
                run_id = self.resubmit(run_id, progress, f"was lost with the SuperLink ({status})")
                deadline = time.monotonic() + budget
                next_status = time.monotonic() + STATUS_EVERY_S
                continue
            progress.check()
            now = time.monotonic()
            streamer_done = self.streamer is not None and self.streamer.poll() is not None
            if streamer_done or now >= next_status:
                row = self.run_status(run_id)
                if row is not None and str(row.get("status", "")).startswith(FINISHED):
                    if self.streamer is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.streamer.wait(timeout=10)
                    progress.check()
                    if lost_serverapp(row) and self.restarts < int(self.args.get("restarts", 3)):
                        self.restarts += 1
                        why = str(row.get("status-details")).strip().splitlines()[0][:200]
                        run_id = self.resubmit(run_id, progress, f"lost its ServerApp ({why})")
                        deadline = time.monotonic() + budget
                        next_status = time.monotonic() + STATUS_EVERY_S
                        continue
                    return row
                next_status = now + (2.0 if streamer_done else STATUS_EVERY_S)
            if now >= next_nodes:
                nodes = self.watch_nodes(nodes)
                next_nodes = now + NODES_EVERY_S
            if now > deadline:
                self.ctl.flwr("stop", str(run_id), "m2diff", timeout=60)
                raise FlowerError(f"run {run_id} did not finish within {budget:.0f} s; stopped")
            time.sleep(1.0)

    def resubmit(self, old: int, progress: Progress, why: str) -> int:
        """Submit the app again, resuming after the last checkpointed round; the new run id."""
        progress.check()
        run_id = self.submit(resume=True)
        progress.rebase()
        self.say(f"run {old} {why}; submitted again as run {run_id}, resuming after round "
                 f"{progress.seen}", err=True)
        return run_id

    def close(self) -> None:
        self.stop_streamer()
        self.front.stop()  # the public port first: no site reaches a SuperLink going down
        if self.link is not None:
            family = descendants(self.link.pid) if self.link.poll() is None else self.family
            stop_group(self.link)
            stop_pids(family, grace_s=2)
        close_logger(self.link_log)
        close_logger(self.run_log)
        close_logger(self.front.logger)
        shutil.rmtree(self.home, ignore_errors=True)


def serve(args: dict[str, str], overrides: list[str]) -> int:
    """Start the SuperLink, run the app (again after a SuperLink restart), stop the SuperLink;
    return the exit status."""
    import os

    from server.strategy import check_strategy

    cfg = compose(overrides)  # fail fast on a bad setting, before any process starts
    try:
        check_strategy(cfg.fl)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = resolve_path(args.get("out") or "runs/federated")
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    logs = log_settings(args, out / "logs")
    own = file_logger(logs, "m2diff-server", "%(asctime)s %(levelname)s %(message)s")
    say = Say(own)
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
        progress = Progress(out, int(coord.cfg.fl.rounds), say)
        run_id = coord.submit()
        say(f"run {run_id} submitted; waiting for {coord.cfg.fl.min_sites} site(s)")
        row = coord.supervise(run_id, progress)
        ok, text = run_outcome(row)
        run_id = int(coord.state["run_id"])
        say(f"run {run_id} {text}", err=not ok)
        coord.save(status=str(row.get("status", "?")))
        print_table(out)
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
