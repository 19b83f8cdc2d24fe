"""The coordinator's processes and its run: the loopback SuperLink and the public nginx
front, started again when they die, the run submitted (again, resuming, when it was lost),
watched until it ends, and everything recorded in OUT/server.json.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m2diff.config import ConfigError, compose, resolve_path
from m2diff.ops import FlowerError
from m2diff.ops.flower import FINISHED, private_federation
from m2diff.ops.logs import LogSettings, Say, close_logger, file_logger, start_logged
from m2diff.ops.procs import (
    descendants,
    exited_children,
    free_port,
    is_flower_process,
    stop_group,
    stop_pids,
    wait_port,
)
from m2diff.ops.words import truthy
from m2diff.runconfig import overrides_text
from m2diff.wire import OUT_DIR_KEY, OVERRIDES_KEY, REGISTERED_SITES_KEY
from server.front import Front, describe, request_cap, settings_from
from server.runstate import RoundLines, read_state, write_state
from server.superlink import (
    auth_enabled,
    database_path,
    lost_serverapp,
    superlink_command,
    tls_files,
)

APP_DIR = Path(__file__).resolve().parents[1]
STATUS_EVERY_S = 10.0   # flwr ls (each call is a Python start, ~1 s CPU)
NODES_EVERY_S = 30.0    # flwr supernode list


class Coordinator:
    """The SuperLink process, its log files and the run it serves, restarted when it dies."""

    def __init__(self, args: dict[str, str], overrides: list[str], out: Path,
                 logs: LogSettings, say: Say) -> None:
        self.args, self.overrides, self.out, self.logs, self.say = args, overrides, out, logs, say
        self.cfg = compose(overrides)
        self.port = int(args.get("port", 8000))  # the front's, public
        old = read_state(out)
        self.link_port = int(args.get("link-port") or 0) or free_port()
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
        self.address = args.get("address") or f"127.0.0.1:{self.link_port}"
        self.ca = resolve_path(args.get("ca"))
        self.ctl = private_federation("m2diff", self.address, self.ca, insecure=self.insecure)
        self.env = self.ctl.env
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
        wait_port("127.0.0.1", self.link_port, self.link, "flower-superlink")
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
        from server.site_names import format_registered

        overrides = list(self.overrides) + (["fl.resume=true"] if resume else [])
        app_dir = Path(self.args.get("app") or APP_DIR)
        run_id = self.ctl.submit(app_dir, {
            OUT_DIR_KEY: str(self.out), OVERRIDES_KEY: overrides_text(overrides),
            REGISTERED_SITES_KEY: format_registered(self.state["nodes"]) if self.auth else ""})
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
        self.streamer, _ = start_logged(self.ctl.log_command(run_id),
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
            self.ctl.stop(int(self.previous_run))
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

    def supervise(self, run_id: int, progress: RoundLines) -> dict[str, Any]:
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
                    self.ctl.stop(run_id)
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
                self.ctl.stop(run_id)
                raise FlowerError(f"run {run_id} did not finish within {budget:.0f} s; stopped")
            time.sleep(1.0)

    def resubmit(self, old: int, progress: RoundLines, why: str) -> int:
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
        self.ctl.close()
