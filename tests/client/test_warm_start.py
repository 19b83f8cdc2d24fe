"""Warm ClientApp starts (client/warm_start.py, client/preloader.py): the preloader forks what
m2diff-clientapp runs.

A real preloader process, a real ``m2diff-clientapp`` console script pointed at it: the
child's output reaches the caller's own stdout/stderr, its exit status is the caller's, the
preloader never imports the app's packages (the app's code comes from the FAB), and without a
preloader the same command runs cold.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

from client import warm_start
from tests.flower_procs import REPO


def _clientapp(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("m2diff-clientapp")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_both_sides_speak_the_same_protocol():
    ns = runpy.run_path(str(REPO / "client" / "preloader.py"), run_name="probe")
    assert ns["SOCKET_ENV"] == warm_start.SOCKET_ENV
    assert ns["EXIT_CODE"].format == warm_start.EXIT_CODE.format


def test_preloader_forks_the_clientapp_with_the_callers_stdio_and_status(tmp_path):
    sock = tmp_path / "warm.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = ("import sys; sys.argv = ['x']; import runpy; "
             f"ns = runpy.run_path({str(REPO / 'client' / 'preloader.py')!r}, run_name='probe'); "
             "ns['preload'](); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('client', 'm2diff', 'server')))")
    out = subprocess.run([sys.executable, "-s", "-c", probe], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr

    preloader = subprocess.Popen([sys.executable, "-s", str(REPO / "client" / "preloader.py"),
                                  str(sock), str(os.getpid())], env=env)
    try:
        deadline = time.monotonic() + 300
        while not sock.exists():
            assert preloader.poll() is None, "the preloader exited"
            assert time.monotonic() < deadline, "the preloader never listened"
            time.sleep(0.2)
        assert (sock.stat().st_mode & 0o777) == 0o600
        warm = {**env, warm_start.SOCKET_ENV: str(sock)}
        ok = _clientapp("--help", env=warm)
        assert ok.returncode == 0 and "ClientApp" in ok.stdout, ok.stdout + ok.stderr
        bad = _clientapp("--insecure", env=warm)  # argparse: exit 2, the reason on stderr
        assert bad.returncode == 2 and "--token" in bad.stderr, bad.stdout + bad.stderr
        assert preloader.poll() is None  # it serves the next task too
    finally:
        preloader.terminate()
        preloader.wait(timeout=60)
    assert not sock.exists()  # the preloader removed its socket
    cold = _clientapp("--insecure", env={**env, warm_start.SOCKET_ENV: str(sock)})  # gone: cold
    assert cold.returncode == 2 and "--token" in cold.stderr
