"""``m2diff-client [key=value ...]``: join a federation as one hospital site.

Checks the site folder first (the ``m2diff check`` logic) and refuses to start with exit
status 1 when no subject is usable; then replaces itself with ``flower-supernode``, which
dials the SuperLink (outbound only) and runs the ClientApp for every round.

Keys:
  superlink=HOST:PORT        the coordinator's SuperLink (required)
  root-certificates=CA.crt   the federation CA (TLS, the default)
  insecure=true              plain HTTP instead (testing only; explicit)
  data=SITE_DIR              the site folder (required); site=NAME (default: folder name)
  auth-key=PATH              SuperNode authentication private key (its .pub registered by the coordinator)
  port=9094                  local ClientApp I/O port (each SuperNode on a host needs its own)
  threads=N                  torch CPU threads per ClientApp (default: all cores; use fewer when
                             several SuperNodes or other jobs share the machine)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from m2diff.config import ConfigError, resolve_path
from m2diff.data.check import summary_line
from m2diff.data.validate import validate_site
from server.cli import parse_words, truthy
from server.flwrctl import flower_env, toml_pairs, tool

KEYS = {"superlink", "root-certificates", "insecure", "data", "site", "auth-key", "port", "threads"}


def supernode_command(args: dict[str, str], site_name: str) -> list[str]:
    """The flower-supernode command line for these settings (raises ConfigError)."""
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
    data = resolve_path(args["data"])
    cmd += ["--node-config", toml_pairs({"data-path": str(data), "site-name": site_name})]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return 0
    try:
        args, rest = parse_words(words, KEYS)
        if rest:
            raise ConfigError(f"unknown key(s) {', '.join(w.split('=')[0] for w in rest)} "
                              "(settings come from the coordinator's run)")
        if not args.get("data"):
            raise ConfigError("data=SITE_DIR is required")
        site, problems = validate_site(resolve_path(args["data"]))
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(summary_line(site, problems))
        if not site.subjects:
            print(f"m2diff-client: {site.root} has no usable subjects; not joining the federation",
                  file=sys.stderr)
            return 1
        cmd = supernode_command(args, args.get("site") or site.name)
    except ConfigError as exc:
        print(f"m2diff-client: {exc}", file=sys.stderr)
        return 2
    print(f"m2diff-client: starting SuperNode for site {args.get('site') or site.name} "
          f"-> {args['superlink']}", flush=True)
    threads = {"OMP_NUM_THREADS": args["threads"], "MKL_NUM_THREADS": args["threads"]} \
        if args.get("threads") else {}
    os.execvpe(cmd[0], cmd, flower_env(resolve_path(os.environ.get("FLWR_HOME", "~/.flwr")),
                                       threads))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
