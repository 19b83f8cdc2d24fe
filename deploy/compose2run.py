#!/usr/bin/env python3
"""Turn deploy/compose.yaml into the `docker run` / `podman run` calls of its services.

deploy/rehearse-containers.sh starts the rehearsal from these argument lists, so the
containers it runs are exactly the services of compose.yaml (tests/test_deploy_files.py
checks the translation). Names follow `docker compose`: container PROJECT-SERVICE-1, network
PROJECT_NET, volume PROJECT_VOLUME (PROJECT: compose.yaml's `name:` unless -p is given).

    compose2run.py [-f COMPOSE] [-p PROJECT] services     # NAME KIND, in start order
    compose2run.py [-f COMPOSE] [-p PROJECT] volumes      # one volume name a line
    compose2run.py [-f COMPOSE] [-p PROJECT] networks     # NAME internal|bridge
    compose2run.py [-f COMPOSE] [-p PROJECT] builds       # IMAGE DOCKERFILE (from the context)
    compose2run.py [-f COMPOSE] [-p PROJECT] run SERVICE  # `run` arguments, NUL-separated
    compose2run.py [-f COMPOSE] [-p PROJECT] health SERVICE  # the healthcheck's command, NUL-sep.

KIND is `once` (a one-shot: another service waits for it to complete successfully),
`healthy` (another service waits for it to be healthy: poll `health SERVICE` with
`ENGINE exec`) or `service`. Only the compose keys below are understood; any other key is an
error, so compose.yaml cannot hold a setting that the rehearsal would silently drop.
Needs PyYAML (in the images: hydra-core depends on it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

KEYS = {"build", "image", "entrypoint", "command", "volumes", "networks", "network_mode",
        "hostname", "restart", "depends_on", "healthcheck", "environment"}
RESTART = {"no": None, "on-failure": "on-failure", "always": "always",
           "unless-stopped": "unless-stopped"}


class ComposeError(ValueError):
    pass


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    for name, svc in doc["services"].items():
        unknown = set(svc) - KEYS
        if unknown:
            raise ComposeError(f"service {name}: compose2run does not translate {sorted(unknown)}")
    return doc


def project(doc: dict, override: str | None) -> str:
    return override or doc.get("name") or "m2diff-rehearsal"


def _words(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        import shlex

        return shlex.split(value)
    return [str(v) for v in value]


def _depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


def order(doc: dict) -> list[tuple[str, str]]:
    """(service, kind) in a start order that honours depends_on (file order among equals)."""
    services = doc["services"]
    conditions: dict[str, set[str]] = {name: set() for name in services}
    for svc in services.values():
        for dep, cond in _depends(svc).items():
            if dep not in services:
                raise ComposeError(f"depends_on names no service: {dep}")
            conditions[dep].add(cond)
    done: list[str] = []
    while len(done) < len(services):
        ready = [n for n, s in services.items() if n not in done and set(_depends(s)) <= set(done)]
        if not ready:
            raise ComposeError("depends_on has a cycle")
        done.append(ready[0])
    out = []
    for name in done:
        conds = conditions[name]
        if "service_completed_successfully" in conds:
            kind = "once"
        elif "service_healthy" in conds:
            kind = "healthy"
        else:
            kind = "service"
        out.append((name, kind))
    return out


def volume(doc: dict, proj: str, spec: str, base: Path) -> str:
    src, _, rest = spec.partition(":")
    if src.startswith((".", "/", "~")):
        src = str((base / src).resolve())
    elif src not in (doc.get("volumes") or {}):
        raise ComposeError(f"volume {src} is not declared")
    else:
        src = f"{proj}_{src}"
    return f"{src}:{rest}" if rest else src


def run_args(doc: dict, proj: str, name: str, base: Path) -> list[str]:
    """The arguments after `ENGINE run` (no -d/--rm: the caller chooses) for one service."""
    svc = doc["services"][name]
    args = ["--name", f"{proj}-{name}-1", "--label", f"com.docker.compose.project={proj}",
            "--label", f"com.docker.compose.service={name}"]
    if svc.get("hostname"):
        args += ["--hostname", str(svc["hostname"])]
    if svc.get("network_mode"):
        if svc.get("networks"):
            raise ComposeError(f"service {name}: network_mode and networks together")
        args += ["--network", str(svc["network_mode"])]
    for net in svc.get("networks") or []:
        if net not in (doc.get("networks") or {}):
            raise ComposeError(f"service {name}: network {net} is not declared")
        args += ["--network", f"{proj}_{net}", "--network-alias", name]
    restart = str(svc.get("restart", "no"))
    if restart not in RESTART:
        raise ComposeError(f"service {name}: restart {restart}")
    if RESTART[restart]:
        args += ["--restart", RESTART[restart]]
    env = svc.get("environment") or {}
    items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
    for key, value in items:
        args += ["-e", f"{key}={value}"]
    for spec in svc.get("volumes") or []:
        args += ["-v", volume(doc, proj, spec, base)]
    entry = _words(svc.get("entrypoint"))
    if entry:
        args += ["--entrypoint", entry[0]]
    if not svc.get("image"):
        raise ComposeError(f"service {name}: no image")
    return [*args, str(svc["image"]), *entry[1:], *_words(svc.get("command"))]


def health(doc: dict, name: str) -> list[str]:
    test = (doc["services"][name].get("healthcheck") or {}).get("test")
    words = _words(test)
    if not words:
        raise ComposeError(f"service {name}: no healthcheck test")
    if words[0] == "CMD":
        return words[1:]
    if words[0] == "CMD-SHELL":
        return ["sh", "-c", " ".join(words[1:])]
    return ["sh", "-c", str(test)] if isinstance(test, str) else words


def builds(doc: dict) -> list[tuple[str, str]]:
    """(image, Dockerfile path relative to the build context), once per image."""
    seen: dict[str, str] = {}
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            if (build.get("context") or ".") != "..":
                raise ComposeError(f"service {name}: build context must be the repository root")
            seen.setdefault(str(svc["image"]), str(build["dockerfile"]))
    return list(seen.items())


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--file", type=Path, default=here / "compose.yaml")
    ap.add_argument("-p", "--project")
    ap.add_argument("what", choices=["services", "volumes", "networks", "builds", "run", "health"])
    ap.add_argument("service", nargs="?")
    a = ap.parse_args(argv)
    doc = load(a.file)
    proj = project(doc, a.project)
    base = a.file.resolve().parent
    if a.what in ("run", "health"):
        if a.service not in doc["services"]:
            ap.error(f"no service {a.service!r} in {a.file}")
        words = run_args(doc, proj, a.service, base) if a.what == "run" else health(doc, a.service)
        sys.stdout.write("\0".join(words) + "\0")
    elif a.what == "services":
        print("\n".join(f"{n} {k}" for n, k in order(doc)))
    elif a.what == "volumes":
        print("\n".join(f"{proj}_{v}" for v in doc.get("volumes") or {}))
    elif a.what == "networks":
        print("\n".join(f"{proj}_{n} {'internal' if (c or {}).get('internal') else 'bridge'}"
                        for n, c in (doc.get("networks") or {}).items()))
    else:
        print("\n".join(f"{image} {dockerfile}" for image, dockerfile in builds(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
