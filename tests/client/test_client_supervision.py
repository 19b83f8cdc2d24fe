"""m2diff-client's supervision of a SuperNode that lost its Fleet connection.

Flower 1.42's SuperNode logs ``Server error '500 ...' for url '.../v1/fleet/pull-messages'``
when the SuperLink answers a Fleet request with a 5xx (seen here under load: its SQLite
state "database is locked"), deactivates its node and never reconnects, while the process
stays up. m2diff-client must restart it rather than wait forever.
"""

from __future__ import annotations

import sys
import time

from client.supervise import run_supernode
from m2diff.ops.logs import LogSettings, close_logger, file_logger

LOST = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("\x1b[91mERROR \x1b[0m:     Server error '500 Internal Server Error' for url "
      "'https://127.0.0.1:1/v1/fleet/pull-messages'", flush=True)
while True:  # the process stays up, connected to nothing
    time.sleep(0.1)
"""


def test_a_supernode_that_lost_the_fleet_is_restarted(tmp_path, capsys):
    settings = LogSettings(tmp_path / "logs")
    log, node_log = file_logger(settings, "m2diff-client"), file_logger(settings, "supernode")
    t0 = time.monotonic()
    code = run_supernode([sys.executable, "-c", LOST], {}, log, node_log, join_timeout=4,
                         retry_s=0.2)
    assert time.monotonic() - t0 < 60  # it did not wait for a process that will never work
    err = capsys.readouterr().err
    assert err.count("lost its connection") >= 2  # restarted, then gave up after join-timeout
    assert "giving up after 4 s" in err and code != 0
    close_logger(log)
    close_logger(node_log)


def test_a_supernode_that_ends_after_a_long_spell_is_started_again(tmp_path, capsys, monkeypatch):
    """Found while testing the restart above: a SuperNode that had been up longer than
    join-timeout and then ended made m2diff-client give up at once (it counted the failures
    from the start of the connected spell)."""
    import client.supervise as cli

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cli.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    ends = []

    class Proc:  # up for 1 h, then ends (e.g. the 5xx restart); then the stop request
        def __init__(self, *a, **k):
            ends.append(clock[0])
            clock[0] += 3600 if len(ends) == 1 else 1
            self.returncode = 0 if len(ends) <= 2 else None

        def poll(self):
            if self.returncode is None:
                self.returncode = 0
                raise KeyboardInterrupt  # the operator stops m2diff-client
            return self.returncode

        def wait(self, timeout=None):
            return self.returncode

    class Pump:
        def join(self, timeout=None):
            pass

    monkeypatch.setattr(cli, "start_logged", lambda cmd, *a, **k: (Proc(), Pump()))
    monkeypatch.setattr(cli, "stop_supernode", lambda proc: None)
    settings = LogSettings(tmp_path / "logs")
    log, node_log = file_logger(settings, "m2diff-client"), file_logger(settings, "supernode")
    assert run_supernode(["x"], {}, log, node_log, join_timeout=300) == 0
    assert len(ends) == 3 and "giving up" not in capsys.readouterr().err
    close_logger(log)
    close_logger(node_log)
