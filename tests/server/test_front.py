"""The public front (server/front.py): the routes it passes are exactly what an installed
Flower's SuperNode calls, nginx accepts the configuration, the request cap follows the model.

The attacks through a running front (``flwr ls / run / supernode register``, runtime routes,
path tricks, an oversized request) run against real processes in tests/e2e/test_deployment.py.
"""

from __future__ import annotations

import http.client
import http.server
import inspect
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from m2diff.config import compose
from server.front import (
    FLEET_PREFIX,
    FLEET_ROUTES,
    HEALTH_PATH,
    MIN_CAP_BYTES,
    FrontSettings,
    model_bytes,
    render_config,
    request_cap,
)
from tests.flower_procs import make_certs

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def test_fleet_routes_are_what_the_installed_supernode_calls_and_the_superlink_serves():
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode import fleet_http_client

    called = set(re.findall(r'path="(/v1/[^"]+)"', inspect.getsource(fleet_http_client)))
    served = {route.path for route in router.routes}
    ours = {FLEET_PREFIX + r for r in FLEET_ROUTES}
    assert called == ours, "Flower's SuperNode calls other Fleet routes: update FLEET_ROUTES"
    assert served == ours, "the SuperLink's Fleet router changed: review FLEET_ROUTES"
    assert all(p.startswith(FLEET_PREFIX) for p in called)


def test_config_passes_only_fleet_posts_and_health(tmp_path):
    certs = make_certs(tmp_path / "pki")
    settings = FrontSettings(host="0.0.0.0", port=18000, link_port=18001, folder=tmp_path / "front",
                             max_body_bytes=10 * 2**20, tls=(certs.ca, certs.cert, certs.key))
    text = render_config(settings)
    locations = re.findall(r"location (= )?(\S+) \{(.*?)\}\s*\}?$", text, flags=re.M)
    passed = {path: body for exact, path, body in locations if "proxy_pass" in body}
    assert set(passed) == {FLEET_PREFIX + r for r in FLEET_ROUTES} | {HEALTH_PATH}
    assert all(exact for exact, path, _ in locations if path in passed)  # exact matches only
    for path, body in passed.items():
        method = "GET" if path == HEALTH_PATH else "POST"
        assert f"limit_except {method} {{ deny all;" in body
        assert f"proxy_pass https://superlink{path};" in body  # a fixed upstream URI
    assert re.search(r"location / \{ return 404; \}", text)
    assert "client_max_body_size 10485760;" in text
    assert "listen 0.0.0.0:18000 ssl;" in text and "server 127.0.0.1:18001;" in text
    assert "proxy_ssl_verify on;" in text and "proxy_ssl_name localhost;" in text
    assert "/v1/control" not in text and "/v1/runtime" not in text
    if not (shutil.which("nginx") or shutil.which(NGINX)):
        pytest.fail("nginx is not installed: the coordinator needs it (apt-get install nginx)")
    (tmp_path / "front" / "tmp").mkdir(parents=True)
    (tmp_path / "front" / "nginx.conf").write_text(text)
    check = subprocess.run([NGINX, "-e", "stderr", "-p", str(tmp_path / "front"), "-c",
                            str(tmp_path / "front" / "nginx.conf"), "-t"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_request_cap_follows_the_model_and_is_configurable():
    tiny = compose(["model=tiny"]).model
    size = model_bytes(tiny)
    assert 2.3 * 2**20 < size < 2.5 * 2**20  # 0.62 M float32 weights, nothing allocated
    assert request_cap(tiny) == max(MIN_CAP_BYTES, 4 * size)
    paper = compose(["model=paper"]).model
    assert model_bytes(paper) > 700 * 2**20 and request_cap(paper) == 4 * model_bytes(paper)
    assert request_cap(tiny, "3") == 3 * 2**20
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="front-max-mb"):
            request_cap(tiny, bad)


class _Upstream(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperLink: the status each path answers with, and what it saw."""

    answers = {"/v1/fleet/pull-messages": 500, "/v1/fleet/get-run": 401, "/health": 200,
               "/v1/fleet/push-object": 200}
    seen: list[str] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(self.answers.get(self.path, 404))
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_real_front_passes_fleet_calls_maps_500_to_503_and_refuses_the_rest(tmp_path):
    """nginx with the rendered config (plain HTTP here; TLS runs in the e2e tests) in front of
    a stand-in upstream: what reaches the upstream and what the caller gets."""
    import logging

    from server.front import Front
    from tests.flower_procs import free_port

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    settings = FrontSettings(host="127.0.0.1", port=port, link_port=upstream.server_address[1],
                             folder=tmp_path / "front", max_body_bytes=1000)
    front = Front(settings, logging.getLogger("test-front"))
    front.start()
    try:
        def call(method: str, path: str, body: bytes = b"") -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, body=body)
                return conn.getresponse().status
            finally:
                conn.close()

        assert call("POST", "/v1/fleet/pull-messages", b"x") == 503  # upstream 500: retryable
        assert call("POST", "/v1/fleet/get-run", b"x") == 401  # other statuses pass unchanged
        assert call("POST", "/v1/fleet/push-object", b"x" * 1000) == 200
        assert call("POST", "/v1/fleet/push-object", b"x" * 1001) == 413
        assert call("GET", "/health") == 200
        for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/get-nodes"),
                             ("POST", "/v1/fleet/../control/start-run"), ("GET", "/docs"),
                             ("POST", "/v1/fleet/pull-messages/../../control/stop-run")):
            assert call(method, path, b"x" if method == "POST" else b"") == 404, path
        assert call("GET", "/v1/fleet/pull-messages") == 403
        assert call("DELETE", "/health") == 403
        assert _Upstream.seen == ["POST /v1/fleet/pull-messages", "POST /v1/fleet/get-run",
                                  "POST /v1/fleet/push-object", "GET /health"]
        # A killed master leaves workers holding the port: a restart reaps them first.
        assert front.proc is not None
        os.kill(front.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not front.died() and time.monotonic() < deadline:
            time.sleep(0.05)
        front.start()
        assert call("GET", "/health") == 200
    finally:
        front.stop()
        upstream.shutdown()
    assert not front.died() and front.proc is None
