"""``m2diff-client [key=value ...]``: join a federation as one hospital site.
``m2diff-client fab-hash [APP_DIR]``: print the hash of an app folder (default: the current
folder) as ``flwr run APP_DIR`` would submit it, for ``allow-fab=``.

Checks the site folder first (the ``m2diff check`` logic) and refuses to start with exit
status 1 when no subject is usable; then runs ``flower-supernode``, which dials the
SuperLink (outbound only) and runs the ClientApp for every round. With ``allow-fab=`` the
SuperNode runs in Flower's process isolation and the ClientApp processes are started by
``m2diff-superexec`` / ``m2diff-clientapp``, which refuse any app whose hash is not listed,
before any of its code runs (client/app_pinning.py). The SuperNode's output is
shown on the console and written to LOG_DIR/supernode.log; this command's own lines go to
LOG_DIR/m2diff-client.log. Both are rotated by size. A SuperNode that ends by itself is
started again (at once after a connected spell; every 10 s while it keeps failing, e.g.
Flower's exit code 305 when the coordinator has not registered the key yet or the site's
previous session still counts as online, up to ``join-timeout`` seconds). Exit status: 0
after Ctrl-C / SIGTERM, 1 data or TLS problem / SuperNode failure, 2 a bad key, 3 refused
by the SuperLink (305) for ``join-timeout`` seconds.

Keys:
  superlink=HOST:PORT        the coordinator's SuperLink (required)
  root-certificates=CA.crt   the federation CA (TLS, the default)
  insecure=true              plain HTTP instead (testing only; explicit)
  data=SITE_DIR              the site folder (required); site=NAME (default: folder name)
  allow-fab=HASH[,HASH]      the apps (FAB sha256, m2diff-client fab-hash) this site runs;
                             any other app the coordinator sends is refused before it runs
  allow-fab-file=FILE        the same, one hash per line (# comments); one of the two is
                             required; allow-fab=any runs whatever app comes (testing only)
  auth-key=PATH              SuperNode authentication private key (its .pub registered by the coordinator)
  port=9094                  local ClientApp I/O port (each SuperNode on a host needs its own)
  threads=N                  torch CPU threads per ClientApp (default: all cores; use fewer when
                             several SuperNodes or other jobs share the machine)
  cache-dir=DIR              where this site caches decoded slices (default SITE_DIR/.m2diff-cache);
                             the coordinator cannot move it; must be writable
  state-dir=DIR              what the site must keep: its privacy ledger, its verdict key
                             (default SITE_DIR/.m2diff-state); persistent storage; must be writable
  log-dir=DIR                log files (default SITE_DIR/.m2diff-logs); must be writable
  log-max-mb=10              rotate a log file at this size ...
  log-backups=5              ... keeping this many old files (NAME.log.1 .. NAME.log.5)
  join-timeout=300           seconds a SuperNode that keeps failing is restarted before giving up
The site's own settings, which the coordinator's run config cannot change:
  device=auto                cpu | cuda | cuda:N | auto
  split=0.7,0.1,0.2          train, val, test fractions of the subject split (participants.tsv wins)
  split-seed=0               seed of the subject split
  max-volume-mb=512          refuse a volume whose header claims more (decoded MiB)
The site's caps and privacy policy (client/site_policy.py; a run outside them is refused):
  max-steps=10000            train.steps per round
  min-batch-size=1           train.batch_size
  min-split-subjects=1       subjects of the train / test split a message uses
  max-model-mparams=500      model size (millions of parameters; model=paper has 200)
  require-privacy=dp         train and evaluate only in runs with this privacy (dp | central_dp)
  max-epsilon=10             sample-level DP: the site's epsilon over its lifetime, all federations
  min-noise-multiplier=0.5   DP noise floor (dp; central_dp: the run's declared noise)
  max-grad-norm=X            cap on the run's privacy.max_grad_norm (dp)
  clip-norm=1.0              require-privacy=central_dp: the site clips its update to this norm
  delta=1e-5                 the delta of the site's epsilon
  require-secagg=true        train and evaluate only with SecAgg+
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from client.app_pinning import ALLOW_ENV, app_hash, parse_allow, read_allow_file
from client.site_errors import SitePolicyError
from client.site_policy import NODE_KEYS, SitePolicy
from m2diff.config import ConfigError, resolve_path
from m2diff.data.check import summary_line
from m2diff.data.validate import validate_site
from m2diff.ops.flower import flower_env, toml_pairs, tool
from m2diff.ops.logs import LEVEL_FORMAT, Say, close_logger, file_logger, log_settings, start_logged
from m2diff.ops.procs import descendants, stop_group, stop_pids
from m2diff.ops.words import parse_words, truthy
from m2diff.wire import DATA_PATH_KEY, SITE_NAME_KEY

KEYS = {"superlink", "root-certificates", "insecure", "data", "site", "auth-key", "port", "threads",
        "log-dir", "log-max-mb", "log-backups", "join-timeout", "allow-fab", "allow-fab-file",
        *NODE_KEYS}
LOG_DIR = ".m2diff-logs"
STATE_DIR = ".m2diff-state"
PATH_KEYS = ("cache-dir", "state-dir")  # node config folders, passed as absolute paths


def writable_dir(value: str, key: str) -> Path:
    """Create ``value`` if needed and check that this account can write into it."""
    path = resolve_path(value)
    assert path is not None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={value}: not a writable folder ({exc.strerror or exc})") from None
    return path


def supernode_command(args: dict[str, str], site_name: str, secret: Path | None = None) -> list[str]:
    """The flower-supernode command line for these settings (raises ConfigError); with the
    SuperExec ``secret`` of app pinning, in Flower's process isolation."""
    if not args.get("superlink"):
        raise ConfigError("superlink=HOST:PORT is required")
    cmd = [tool("flower-supernode"), "--superlink", args["superlink"],
           "--port", str(int(args.get("port", 9094)))]
    if truthy(args.get("insecure")):
        cmd.append("--insecure")
    else:
        ca = resolve_path(args.get("root-certificates"))
        if ca is None or not ca.is_file():
            raise ConfigError("TLS needs root-certificates=CA.crt (the federation CA); "
                              "insecure=true for plain HTTP")
        cmd += ["--root-certificates", str(ca)]
    if args.get("auth-key"):
        key = resolve_path(args["auth-key"])
        if key is None or not key.is_file():
            raise ConfigError(f"auth-key={args['auth-key']}: no such file")
        cmd += ["--auth-supernode-private-key", str(key)]
    node = {DATA_PATH_KEY: str(resolve_path(args["data"])), SITE_NAME_KEY: site_name}
    for key in NODE_KEYS:
        if args.get(key):
            node[key] = str(resolve_path(args[key])) if key in PATH_KEYS else args[key]
    if args.get("require-privacy") and args["require-privacy"] not in ("dp", "central_dp", "none"):
        raise ConfigError(f"require-privacy={args['require-privacy']}: choose dp, central_dp or none")
    try:
        SitePolicy.from_node_config(node)
    except SitePolicyError as exc:
        raise ConfigError(str(exc).replace("node config ", "")) from None
    if secret is not None:  # app pinning: ClientApps come from m2diff-superexec
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    cmd += ["--node-config", toml_pairs(node)]
    return cmd


def allowed_apps(args: dict[str, str]) -> frozenset[str] | None:
    """The FAB hashes of ``allow-fab=`` / ``allow-fab-file=``; None for ``allow-fab=any``
    (raises ConfigError when neither is given or a hash is malformed)."""
    if args.get("allow-fab", "").strip().lower() == "any":
        return None
    hashes: set[str] = set()
    try:
        if args.get("allow-fab"):
            hashes |= parse_allow(args["allow-fab"])
        if args.get("allow-fab-file"):
            hashes |= read_allow_file(resolve_path(args["allow-fab-file"]) or "")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"allow-fab= / allow-fab-file=: {exc}") from None
    if not hashes:
        raise ConfigError("allow-fab=HASH or allow-fab-file=FILE is required: the app (FAB "
                          "sha256) this site has vetted, from `m2diff-client fab-hash APP_DIR` "
                          "on that release; allow-fab=any runs any app the coordinator sends "
                          "(testing only)")
    return frozenset(hashes)


def superexec_secret(state: Path) -> Path:
    """The shared secret the SuperNode and m2diff-superexec authenticate task acquisition
    with (Flower's SuperExec auth): ``state/superexec.secret``, 32 random bytes, mode 0600."""
    path = state / "superexec.secret"
    if not path.is_file() or path.stat().st_size < 32:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path


def superexec_command(port: int, secret: Path) -> Callable[[int], list[str]]:
    """The m2diff-superexec command for the SuperNode of ``port``, given that SuperNode's pid."""
    def command(supernode_pid: int) -> list[str]:
        return [tool("m2diff-superexec"), "--runtime-api-address", f"127.0.0.1:{port}",
                "--insecure", "--parent-pid", str(supernode_pid),
                "--superexec-auth-secret-file", str(secret)]
    return command


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


def fab_hash_main(words: list[str]) -> int:
    """``m2diff-client fab-hash [APP_DIR]``: the app's FAB hash, as ``flwr run`` submits it."""
    if len(words) > 1:
        print("m2diff-client fab-hash [APP_DIR]", file=sys.stderr)
        return 2
    app = resolve_path(words[0] if words else ".")
    assert app is not None
    if not (app / "pyproject.toml").is_file():
        print(f"m2diff-client fab-hash: {app} is not a Flower app folder (no pyproject.toml)",
              file=sys.stderr)
        return 2
    try:
        digest = app_hash(app)
    except (ValueError, OSError) as exc:
        print(f"m2diff-client fab-hash: {app}: {exc}", file=sys.stderr)
        return 2
    print(f"sha256:{digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return 0
    if words and words[0] == "fab-hash":
        return fab_hash_main(words[1:])
    log = supernode_log = None
    try:
        args, rest = parse_words(words, KEYS)
        if rest:
            raise ConfigError(f"unknown key(s) {', '.join(w.split('=')[0] for w in rest)} "
                              "(settings come from the coordinator's run)")
        if not args.get("data"):
            raise ConfigError("data=SITE_DIR is required")
        data = resolve_path(args["data"])
        assert data is not None
        if args.get("cache-dir"):
            writable_dir(args["cache-dir"], "cache-dir")
        state = writable_dir(args.get("state-dir") or str(data / STATE_DIR), "state-dir")
        settings = log_settings(args, data / LOG_DIR)
        writable_dir(str(settings.folder), "log-dir")
        log = file_logger(settings, "m2diff-client", LEVEL_FORMAT)
        try:  # the site's policy keys, checked before anything starts
            policy = SitePolicy.from_node_config({k: args[k] for k in NODE_KEYS if k in args})
        except SitePolicyError as exc:
            raise ConfigError(str(exc).replace("node config ", "")) from None
        site, problems = validate_site(data, max_volume_mb=policy.max_volume_mb)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
            log.warning("problem: %s", problem)
        print(summary_line(site, problems))
        log.info("%s", summary_line(site, problems))
        if not site.subjects:
            print(f"m2diff-client: {site.root} has no usable subjects; not joining the federation",
                  file=sys.stderr)
            log.error("no usable subjects; not joining the federation")
            return 1
        name = args.get("site") or site.name
        apps = allowed_apps(args)
        secret = superexec_secret(state) if apps is not None else None
        cmd = supernode_command(args, name, secret)
        text = (f"starting SuperNode for site {name} -> {args['superlink']}; "
                f"logs in {settings.folder}"
                + (f"; cache in {resolve_path(args['cache-dir'])}" if args.get("cache-dir") else "")
                + (f"; apps allowed: {', '.join(sorted(apps))}" if apps is not None else
                   "; allow-fab=any: ANY app the coordinator sends runs here (testing only)"))
        Say("m2diff-client", log)(text)
        extra = {"OMP_NUM_THREADS": args["threads"], "MKL_NUM_THREADS": args["threads"]} \
            if args.get("threads") else {}
        if apps is not None:
            extra[ALLOW_ENV] = ",".join(sorted(apps))
        env = flower_env(resolve_path(os.environ.get("FLWR_HOME", "~/.flwr")), extra)
        executor = None if secret is None else \
            superexec_command(int(args.get("port", 9094)), secret)
        supernode_log = file_logger(settings, "supernode")
        try:
            join_timeout = float(args.get("join-timeout", 300))
        except ValueError:
            raise ConfigError(f"join-timeout={args['join-timeout']}: not a number of seconds") from None
        return run_supernode(cmd, env, log, supernode_log, join_timeout, executor=executor)
    except ConfigError as exc:
        print(f"m2diff-client: {exc}", file=sys.stderr)
        if log is not None:
            log.error("%s", exc)
        return 2
    finally:
        for logger in (log, supernode_log):
            if logger is not None:
                close_logger(logger)


if __name__ == "__main__":
    sys.exit(main())
