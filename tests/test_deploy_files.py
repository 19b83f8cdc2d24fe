"""Static checks of deploy/: Dockerfiles, compose.yaml, the runbooks and make-certs.sh.

No container engine is needed (or used): the checks read the files, compare every command
and key they name with what the project's CLIs accept, and run make-certs.sh with openssl.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from client.cli import KEYS as CLIENT_KEYS
from m2diff.config import compose
from server.cli import KEYS as SERVER_KEYS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
RUNBOOKS = [DEPLOY / "RUNBOOK-coordinator.md", DEPLOY / "RUNBOOK-hospital.md", DEPLOY / "README.md"]
# image name -> the entry point it runs (docker run IMAGE key=value ...)
IMAGES = {"m2diff-coordinator": "m2diff-server", "m2diff-site:cpu": "m2diff-client",
          "m2diff-site:cuda": "m2diff-client"}


def scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def shell_commands(md: Path) -> list[list[str]]:
    """Every command line in the fenced code blocks of a markdown file, as words."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", md.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith(("[", "#", "site/", "participants", "sub-", "default",
                                             "address", "root-certificates")):
                lines.append(shlex.split(line))
    return lines


def inline_commands(md: Path) -> list[list[str]]:
    """`flwr ...`, `m2diff ...` commands quoted inline in the prose."""
    found = re.findall(r"`((?:flwr|m2diff|m2diff-server|m2diff-client) [^`]+)`", md.read_text())
    return [shlex.split(c) for c in found]


def invocations(words: list[str]) -> list[tuple[str, list[str]]]:
    """(entry point, key=value arguments) for m2diff-server/-client in one command line."""
    out = []
    for i, word in enumerate(words):
        tool = word if word in ("m2diff-server", "m2diff-client") else IMAGES.get(word)
        if tool and (word == tool or "run" in words[:i]):
            out.append((tool, [w for w in words[i + 1:] if "=" in w and not w.startswith("-")]))
    return out


def check_keys(tool: str, words: list[str], where: str) -> None:
    keys = {w.split("=", 1)[0] for w in words}
    if tool == "m2diff-client":
        assert keys <= CLIENT_KEYS, f"{where}: m2diff-client has no key(s) {keys - CLIENT_KEYS}"
    else:
        overrides = [w for w in words if w.split("=", 1)[0] not in SERVER_KEYS]
        compose(overrides)  # raises ConfigError on a key that is neither a server key nor a setting


# -- Dockerfiles -------------------------------------------------------------------------------

def test_three_dockerfiles():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.coordinator", "Dockerfile.site-cpu",
                                              "Dockerfile.site-cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_sources_exist_and_basics(dockerfile):
    ins = instructions(dockerfile)
    copies = [args for word, args in ins if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY source {src} is not in the repo"
    env = " ".join(args for word, args in ins if word == "ENV")
    assert "FLWR_DISABLE_UPDATE_CHECK=1" in env
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env
    users = [args for word, args in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any(word == "HEALTHCHECK" for word, _ in ins)
    entry = [args for word, args in ins if word == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1])[0] in scripts()
    run = " ".join(args for word, args in ins if word == "RUN")
    assert "pip install ." in run
    if dockerfile.name == "Dockerfile.site-cuda":
        base = next(args for word, args in ins if word == "ARG" and args.startswith("BASE_IMAGE="))
        assert base.split("=", 1)[1].startswith(("pytorch/pytorch:", "nvidia/cuda:"))
    else:  # CPU torch first, as scripts/bootstrap.sh does
        assert "torch==2.13.0" in " ".join(args for word, args in ins if word == "ARG")
        assert run.index("TORCH_INDEX") < run.index("pip install .")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_build_from_any_base(dockerfile):
    """``--build-arg BASE_IMAGE=...`` picks the base; the default is the official image. The
    CPU images make a venv from the base's python3 (a distribution's python3 has no
    ``python``) and pass the wheel sources to pip as build arguments only."""
    ins = instructions(dockerfile)
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    args_before = [args for word, args in ins[:first_from] if word == "ARG"]
    assert [a.split("=", 1)[0] for a in args_before] == ["BASE_IMAGE"], args_before
    default = args_before[0].split("=", 1)[1]
    assert [args for word, args in ins if word == "FROM"] == ["${BASE_IMAGE}"]
    if dockerfile.name == "Dockerfile.site-cuda":
        assert default.startswith("pytorch/pytorch:")
        return
    assert re.fullmatch(r"python:3\.1[1-9]-slim", default), default
    run = [args for word, args in ins if word == "RUN"]
    assert "python3 -m venv /opt/venv" in run[0]
    env = " ".join(args for word, args in ins if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    arg_names = {args.split("=", 1)[0] for word, args in ins if word == "ARG"}
    assert {"PIP_FIND_LINKS", "TORCH_INDEX", "TORCH_SPEC"} <= arg_names
    assert "PIP_FIND_LINKS" not in env  # a build argument, not baked into the image
    # an empty PIP_FIND_LINKS is unset before pip runs (pip reads the variable itself)
    for step in run:
        if "pip install" in step:
            assert "unset PIP_FIND_LINKS" in step, step[:120]


def test_cpu_images_share_their_torch_and_dependency_layers():
    """The coordinator and the CPU site image begin with the same instructions (torch, then
    the dependencies from pyproject.toml alone), so the engine builds those layers once; the
    code is copied after them, so a code change rebuilds only the small layers."""
    coord = instructions(DEPLOY / "Dockerfile.coordinator")
    site = instructions(DEPLOY / "Dockerfile.site-cpu")
    shared = 0
    while coord[shared] == site[shared]:
        shared += 1
    prefix = " ".join(args for _, args in coord[:shared])
    assert "TORCH_SPEC" in prefix and "pip install -r" in prefix and "COPY pyproject.toml" \
        in " ".join(f"{w} {a}" for w, a in coord[:shared])
    # both images hold the same app folder (the FAB the coordinator submits, the site pins),
    # copied after the shared layers
    app_dirs = ("./", "./m2diff", "./client", "./server", "./conf")
    app = {name: [(i, a) for i, (w, a) in enumerate(ins) if w == "COPY" and a.endswith(app_dirs)]
           for name, ins in (("coordinator", coord), ("site", site))}
    assert [a for _, a in app["coordinator"]] == [a for _, a in app["site"]]
    assert len(app["site"]) == 5 and min(i for i, _ in app["site"] + app["coordinator"]) > shared


def test_coordinator_image_and_the_test_command_install_the_front():
    """The public port is nginx (server/front.py): the coordinator image has it; the README's
    test command (scripts/test.sh, which .ci/run calls) installs it where it is missing,
    before pytest, and fails loudly where it cannot."""
    run = " ".join(args for word, args in instructions(DEPLOY / "Dockerfile.coordinator")
                   if word == "RUN")
    assert re.search(r"apt-get install [^&]*\bnginx\b", run)
    ensure = (REPO / "scripts" / "ensure-nginx.sh").read_text()
    assert "command -v nginx" in ensure and "apt-get install" in ensure and "exit 1" in ensure
    test = (REPO / "scripts" / "test.sh").read_text()
    assert test.index("bash scripts/ensure-nginx.sh") < test.index("-m pytest")
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_dockerignore_keeps_data_out():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"data", "runs", ".venv", ".git", "**/.m2diff-cache", "deploy/pki"} <= ignored
    for dockerfile in DOCKERFILES:
        for word, args in instructions(dockerfile):
            if word in ("COPY", "ADD"):
                for src in [w for w in shlex.split(args) if not w.startswith("--")][:-1]:
                    assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"


# -- compose.yaml ------------------------------------------------------------------------------

def test_compose_services_and_files():
    doc = compose_file()
    services = doc["services"]
    assert {"certs", "generate", "coordinator", "site-a", "site-b", "site-c"} <= set(services)
    volumes, networks = set(doc.get("volumes") or {}), set(doc.get("networks") or {})
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for mount in svc.get("volumes", []):
            src = mount.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: bind mount {src} does not exist"
            else:
                assert src in volumes, f"{name}: volume {src} is not declared"
        for net in svc.get("networks", []):
            assert net in networks, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, name
        entry = svc.get("entrypoint")
        if entry and entry[0] != "bash":
            assert entry[0] in scripts(), name
    assert doc["networks"]["fednet"].get("internal") is True
    certs = services["certs"]
    assert any(m.startswith("./make-certs.sh:") for m in certs["volumes"])
    assert "DNS:coordinator" in certs["command"][1] and "IP:127.0.0.1" in certs["command"][1]
    assert services["generate"]["command"] == ["generate", "out=/data", "sites=3", "size=tiny"]


def test_compose_commands_use_real_keys():
    services = compose_file()["services"]
    coord = services["coordinator"]["command"]
    check_keys("m2diff-server", coord, "compose coordinator")
    args = dict(w.split("=", 1) for w in coord)
    assert args["auth"] == "true" and args["auth-keys"] and args["port"] == "8000"
    assert "insecure" not in args and all(args.get(k) for k in ("ca", "cert", "key"))
    assert "database" not in args  # the SuperLink's state persists under out (the runs volume)
    keys_made = set(services["certs"]["command"][2:])
    for name in ("site-a", "site-b", "site-c"):
        svc = services[name]
        check_keys("m2diff-client", svc["command"], f"compose {name}")
        site = dict(w.split("=", 1) for w in svc["command"])
        assert site["superlink"] == "coordinator:8000" and site["root-certificates"]
        assert Path(site["auth-key"]).stem in keys_made
        mounts = svc["volumes"]
        assert any(m.endswith(":/data:ro") for m in mounts), "site data must be read-only"
        assert any(m.endswith(":/var/cache/m2diff") for m in mounts), "the cache must be writable"
        # read-only data: the site's own cache and logs go to the writable volume
        assert site["cache-dir"] == "/var/cache/m2diff"
        assert site["log-dir"].startswith("/var/cache/m2diff/")


# -- runbooks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("md", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_commands_exist_and_keys_are_real(md):
    commands = shell_commands(md) + inline_commands(md)
    assert commands
    seen = set()
    for words in commands:
        for tool, keys in invocations(words):
            check_keys(tool, keys, f"{md.name}: {' '.join(words)[:80]}")
            seen.add(tool)
        if words[0] in ("m2diff", "m2diff-server", "m2diff-client"):
            assert words[0] in scripts()
        if words[0] == "m2diff" and len(words) > 1:
            assert words[1] in m2diff_commands(), f"{md.name}: no m2diff {words[1]}"
        if words[0] in ("bash", "deploy/make-certs.sh") or words[0].startswith("deploy/"):
            script = words[1] if words[0] == "bash" else words[0]
            assert (REPO / script).is_file(), f"{md.name}: {script} does not exist"
        if words[0] == "flwr":
            sub = [w for w in words[1:3] if not w.startswith("-") and w.isidentifier()]
            sub = sub[:2] if sub and sub[0] == "supernode" else sub[:1]
            assert flwr_has(tuple(sub)), f"{md.name}: flwr {' '.join(sub)} does not exist"
    if md.name == "RUNBOOK-coordinator.md":
        assert "m2diff-server" in seen
    if md.name == "RUNBOOK-hospital.md":
        assert "m2diff-client" in seen


@cache
def m2diff_commands() -> set[str]:
    from m2diff.cli import COMMANDS

    return set(COMMANDS) | {"--help", "-h"}


@cache
def flwr_has(sub: tuple[str, ...]) -> bool:
    flwr = shutil.which("flwr", path=str(Path(shutil.which("python") or "").parent)) \
        or str(REPO / ".venv" / "bin" / "flwr")
    res = subprocess.run([flwr, *sub, "--help"], capture_output=True, text=True, timeout=120,
                         env={"FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin",
                              "HOME": "/tmp"})
    return res.returncode == 0 and "No such command" not in res.stdout + res.stderr


def test_flwr_check_tells_real_from_made_up():
    assert flwr_has(("supernode", "register")) and not flwr_has(("supernode", "rotate"))


def test_readme_links_runbooks():
    text = (REPO / "README.md").read_text()
    assert "deploy/RUNBOOK-coordinator.md" in text and "deploy/RUNBOOK-hospital.md" in text
    for md in RUNBOOKS:
        for link in re.findall(r"\]\(([^)#:]+)\)", md.read_text()):
            assert (md.parent / link).exists(), f"{md.name}: broken link {link}"


# -- make-certs.sh -----------------------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="needs openssl and ssh-keygen")
def test_make_certs_produces_verified_cert_with_sans_and_site_keys(tmp_path):
    from cryptography import x509

    out = tmp_path / "pki"
    san = "DNS:coordinator,DNS:fl.example.org,IP:127.0.0.1"
    res = subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(out), san, "hospital-a",
                          "hospital-b"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"),
                             str(out / "superlink.crt")], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # DNS:localhost is added (the front verifies the loopback SuperLink by it), once each
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["coordinator", "fl.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    # The CA is a CA: critical basicConstraints, may sign certificates and CRLs only.
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    # umask 077 before anything is created: the folders are not listable by others.
    assert (out.stat().st_mode & 0o077, (out / "sites").stat().st_mode & 0o077) == (0, 0)
    for site in ("hospital-a", "hospital-b"):
        key, pub = out / "sites" / f"{site}.key", out / "sites" / f"{site}.key.pub"
        assert key.is_file() and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert key.stat().st_mode & 0o077 == 0, "a site's private key must be private"
    assert (out / "ca.key").stat().st_mode & 0o077 == 0
    # a second run keeps the CA and the site keys (rotation of the server cert only)
    ca_before = (out / "ca.crt").read_bytes()
    key_before = (out / "sites" / "hospital-a.key").read_bytes()
    subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(out), san, "hospital-a"],
                   check=True, capture_output=True, timeout=300)
    assert (out / "ca.crt").read_bytes() == ca_before
    assert (out / "sites" / "hospital-a.key").read_bytes() == key_before


# -- compose2run.py and rehearse-containers.sh -------------------------------------------------

def compose2run(*args: str) -> str:
    res = subprocess.run([sys.executable, str(DEPLOY / "compose2run.py"), "-p", "proj", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_compose2run_matches_compose_yaml():
    """Every service's `run` arguments hold exactly what compose.yaml says: image, entry
    point, command, volumes (named ones as PROJECT_NAME), network, hostname, restart."""
    doc = compose_file()
    services = doc["services"]
    order = [line.split() for line in compose2run("services").splitlines()]
    assert sorted(n for n, _ in order) == sorted(services)
    position = {n: i for i, (n, _) in enumerate(order)}
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert position[dep] < position[name]
            kind = dict(order)[dep]
            assert kind == {"service_completed_successfully": "once",
                            "service_healthy": "healthy"}.get(cond["condition"], kind)
    assert dict(order)["coordinator"] == "healthy" and dict(order)["certs"] == "once"
    assert compose2run("volumes").split() == [f"proj_{v}" for v in doc["volumes"]]
    assert compose2run("networks").split() == ["proj_fednet", "internal"]
    builds = dict(line.split() for line in compose2run("builds").splitlines())
    assert builds == {svc["image"]: svc["build"]["dockerfile"] for svc in services.values()
                      if "build" in svc}
    for name, svc in services.items():
        words = compose2run("run", name).split("\0")
        assert words[-1] == ""
        words = words[:-1]
        opts: dict[str, list[str]] = {}
        i = 0
        while words[i].startswith("-"):
            opts.setdefault(words[i], []).append(words[i + 1])
            i += 2
        image, rest = words[i], words[i + 1:]
        assert image == svc["image"]
        entry = svc.get("entrypoint") or []
        assert opts.get("--entrypoint", []) == entry[:1]
        assert rest == [*entry[1:], *svc["command"]], name
        assert opts["--name"] == [f"proj-{name}-1"]
        expected = []
        for mount in svc.get("volumes", []):
            src, rest_ = mount.split(":", 1)
            src = str((DEPLOY / src).resolve()) if src.startswith(".") else f"proj_{src}"
            expected.append(f"{src}:{rest_}")
        assert opts.get("-v", []) == expected, name
        if "network_mode" in svc:
            assert opts["--network"] == [svc["network_mode"]]
        else:
            assert opts["--network"] == [f"proj_{n}" for n in svc["networks"]]
            assert opts["--network-alias"] == [name] * len(svc["networks"])
        assert opts.get("--hostname", []) == ([svc["hostname"]] if "hostname" in svc else [])
        restart = svc.get("restart", "no")
        assert opts.get("--restart", []) == ([] if restart == "no" else [restart])
    health = compose2run("health", "coordinator").split("\0")[:-1]
    assert health == services["coordinator"]["healthcheck"]["test"][1:]


def test_compose2run_refuses_what_it_does_not_translate(tmp_path):
    doc = compose_file()
    doc["services"]["coordinator"]["ports"] = ["8000:8000"]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = subprocess.run([sys.executable, str(DEPLOY / "compose2run.py"), "-f", str(path),
                          "services"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "ports" in res.stderr


def test_rehearsal_script_runs_only_compose_services():
    """deploy/rehearse-containers.sh starts the services from compose2run's arguments, in its
    order; its only other containers are helpers without a network (the app-pin comparison,
    the output check and copy). Everything it creates is removed by the EXIT trap."""
    script = DEPLOY / "rehearse-containers.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    runs = [line.strip() for line in text.splitlines() if re.search(r"\be run\b", line)]
    services = [r for r in runs if '"${run[@]}"' in r]
    helpers = [r for r in runs if r not in services]
    assert len(services) == 3  # once, healthy, service
    assert helpers and all("--network none" in r for r in helpers), helpers
    assert "c2r services" in text and "c2r run" in text and "c2r networks" in text
    assert "c2r volumes" in text and "c2r builds" in text
    assert "trap cleanup EXIT" in text
    for kind in ("CONTAINERS", "NETWORKS", "VOLUMES"):
        assert f"{kind}+=(" in text
    assert 'CONTAINER_ENGINE' in text and 'CONTAINER_FLAGS' in text and "BASE_IMAGE" in text
