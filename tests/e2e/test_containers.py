"""The container rehearsal (deploy/rehearse-containers.sh) for real: opt-in.

It builds the coordinator and site images (minutes cold, GBs of disk) and runs compose.yaml's
federation in containers, so it runs only with ``M2DIFF_CONTAINER_TESTS=1`` and a container
engine (``CONTAINER_ENGINE``, else docker, else podman); the script's other variables
(``CONTAINER_FLAGS``, ``BUILD_FLAGS``, ``BASE_IMAGE``, ``PIP_FIND_LINKS``, ``SKIP_BUILD``)
pass through. On the project's machines:

    M2DIFF_CONTAINER_TESTS=1 CONTAINER_ENGINE=podman \\
    CONTAINER_FLAGS="--runtime runc --cgroup-manager=cgroupfs" \\
    BUILD_FLAGS="--network host -v /etc/ssl/certs:/etc/ssl/certs:ro" \\
    BASE_IMAGE=localhost/debian-py:bookworm PIP_FIND_LINKS=/opt/wheels \\
    .venv/bin/python -m pytest tests/e2e/test_containers.py -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "rehearse-containers.sh"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _engine() -> str | None:
    wanted = os.environ.get("CONTAINER_ENGINE")
    for name in ([wanted] if wanted else ["docker", "podman"]):
        if shutil.which(name):
            return name
    return None


def _skip_reason() -> str | None:
    if os.environ.get("M2DIFF_CONTAINER_TESTS") != "1":
        return "opt-in: set M2DIFF_CONTAINER_TESTS=1 (builds two images of ~2.4 GB each)"
    if _engine() is None:
        return f"no container engine ({os.environ.get('CONTAINER_ENGINE') or 'docker, podman'})"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_rehearse_containers(tmp_path):
    env = {**os.environ, "CONTAINER_ENGINE": _engine(), "REHEARSAL_OUT": str(tmp_path),
           "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=3600)
    print(res.stdout[-6000:], res.stderr[-3000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "PASS: 3 sites, 2 rounds" in res.stdout
    out = tmp_path / "rehearsal"
    rows = json.loads((out / "rounds.json").read_text())
    for rnd in (1, 2):
        trained = {r["site"] for r in rows if r["round"] == rnd and "train_loss" in r}
        assert trained == {"hospital-a", "hospital-b", "hospital-c"}, (rnd, rows)
    assert json.loads((out / "server.json").read_text())["status"] == "finished:completed"
    assert (out / "checkpoint.pt").is_file()
    # everything the script started is gone
    project = [line for line in res.stdout.splitlines() if "removed" in line]
    assert project and "could not remove" not in res.stdout + res.stderr
