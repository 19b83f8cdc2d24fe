"""The shared process plumbing (m2diff/ops): rotated log files of a child's output, the
console line, the key=value words, waiting for a port, seeing an exited child."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from m2diff.config import ConfigError
from m2diff.ops import FlowerError
from m2diff.ops.flower import private_federation
from m2diff.ops.logs import LogSettings, Say, close_logger, file_logger, start_logged
from m2diff.ops.procs import free_port, wait_port
from m2diff.ops.words import parse_words, truthy

CHILD = r"""
import sys
for i in range(400):
    print(f"\x1b[92mINFO \x1b[0m: line {i:04d} " + "x" * 40, flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""


def test_child_output_goes_to_rotated_files_and_the_console(tmp_path):
    settings = LogSettings(tmp_path / "logs", max_bytes=4000, backups=2)
    logger = file_logger(settings, "child")
    echo = io.StringIO()
    proc, pump = start_logged([sys.executable, "-c", CHILD], logger, echo)
    assert proc.wait(timeout=60) == 0
    pump.join(timeout=10)
    close_logger(logger)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["child.log", "child.log.1", "child.log.2"]  # rotated, at most 2 backups
    assert all((tmp_path / "logs" / f).stat().st_size <= 4000 for f in files)
    text = (tmp_path / "logs" / "child.log").read_text()
    assert "line 0399" in text and "to stderr" in text and "\x1b[" not in text
    assert (
        "line 0398"
        in (tmp_path / "logs" / "child.log").read_text()
        + (tmp_path / "logs" / "child.log.1").read_text()
    )
    # the console gets every line, colours and all, none of the old ones is lost there
    assert echo.getvalue().count("\n") == 401 and "\x1b[92m" in echo.getvalue()
    assert LogSettings.from_args(tmp_path, "0.5", "3").max_bytes == 2**19


def test_say_goes_to_the_console_and_the_log(tmp_path, capsys):
    logger = file_logger(LogSettings(tmp_path), "cmd")
    say = Say("m2diff-x", logger)
    say("hello")
    say("trouble", err=True)
    close_logger(logger)
    captured = capsys.readouterr()
    assert captured.out == "m2diff-x: hello\n" and captured.err == "m2diff-x: trouble\n"
    assert "hello" in (tmp_path / "cmd.log").read_text()


def test_words_split_into_own_keys_and_overrides():
    args, rest = parse_words(["log_dir=/x", "fl.rounds=3", "a=b=c", "a=1"], {"log-dir", "a"})
    assert args == {"log-dir": "/x", "a": "1"} and rest == ["fl.rounds=3"]
    args, rest = parse_words(["export_dir=d", "export-dir=e"], {"export_dir"}, dashes=False)
    assert args == {"export_dir": "d"} and rest == ["export-dir=e"]
    with pytest.raises(ConfigError, match="'nope' is not key=value"):
        parse_words(["nope"], set())
    assert truthy("Yes") and truthy("1") and not truthy(None) and not truthy("0")


def test_wait_port_returns_when_listening_and_names_a_dead_process(tmp_path):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_port("127.0.0.1", server.getsockname()[1], None, "test", timeout=5)
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(FlowerError, match="thing exited with status 3 at start; see x.log"):
        wait_port("127.0.0.1", free_port(), dead, "thing", timeout=5, log="x.log")
    with pytest.raises(FlowerError, match="does not listen"):
        wait_port("127.0.0.1", free_port(), None, "thing", timeout=0.5)


def test_private_federation_home_is_removed_on_close():
    ctl = private_federation("x", "127.0.0.1:1", insecure=True)
    assert (ctl.home / "config.toml").is_file() and ctl.env["FLWR_HOME"] == str(ctl.home)
    ctl.close()
    assert not ctl.home.exists()
    with pytest.raises(FlowerError, match="root-certificates or insecure"):
        private_federation("x", "127.0.0.1:1")


def test_an_exited_superexec_is_seen(tmp_path):
    """Flower 1.42's SuperLink never restarts its flower-superexec; m2diff-server restarts the
    SuperLink when that child has exited (a zombie of the SuperLink)."""
    import os
    import shutil
    import subprocess
    import time

    from m2diff.ops.procs import exited_children

    fake = tmp_path / "flower-superexec"
    shutil.copy("/bin/true", fake)
    child = subprocess.Popen([str(fake)])
    deadline = time.monotonic() + 10
    while not exited_children(os.getpid(), "flower-superexe") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exited_children(os.getpid(), "flower-superexe") == [child.pid]
    assert exited_children(os.getpid(), "flower-superlink") == []
    child.wait()
    assert exited_children(os.getpid(), "flower-superexe") == []
