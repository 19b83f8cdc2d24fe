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

import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client.app_pinning import ALLOW_ENV, app_hash, parse_allow, read_allow_file
from client.site_errors import SitePolicyError
from client.site_policy import NODE_KEYS, SitePolicy
from client.supervise import run_supernode
from m2diff.config import COMPOSE_CACHE_ENV, ConfigError, resolve_path
from m2diff.data.check import summary_line
from m2diff.data.validate import validate_site
from m2diff.ops.flower import flower_env, toml_pairs, tool
from m2diff.ops.logs import LEVEL_FORMAT, Say, close_logger, file_logger, log_settings
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
        # Each message's ClientApp composes the run's settings: keep them (m2diff/config.py).
        extra[COMPOSE_CACHE_ENV] = str(state / "compose-cache")
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
