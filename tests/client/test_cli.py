"""``m2diff-client`` without a federation: the checks before a SuperNode starts, its
command line and node config, the site's own folders, and the SuperNode supervision
(restarts, giving up, one SIGTERM on stop)."""

from __future__ import annotations

import shutil
import sys

import pytest
from flwr.app import Context, RecordDict

from client.cli import main as client_main
from client.cli import supernode_command
from client.site import SiteRun
from client.supervise import run_supernode
from m2diff.config import ConfigError
from m2diff.data.cache import cache_folder
from m2diff.ops.logs import LogSettings, close_logger, file_logger


def test_client_refuses_unusable_site(tmp_path, tiny_sites, capsys):
    empty = tmp_path / "empty-site"
    empty.mkdir()
    assert client_main(["superlink=127.0.0.1:1", "insecure=true", f"data={empty}"]) == 1
    assert "no usable subjects" in capsys.readouterr().err
    site = tmp_path / "site"
    shutil.copytree(tiny_sites[0], site)
    assert client_main(["superlink=h:8000", f"data={site}"]) == 2  # TLS needs the CA
    cmd = supernode_command(
        {"superlink": "h:8000", "insecure": "true", "data": str(site), "port": "9100"}, "hospital-a"
    )
    assert cmd[cmd.index("--node-config") + 1] == f"data-path='{site}' site-name='hospital-a'"
    assert "--insecure" in cmd and cmd[cmd.index("--port") + 1] == "9100"
    # A hospital that insists on DP says so in its node config; a typo is a clear error.
    cmd = supernode_command(
        {"superlink": "h:8000", "insecure": "true", "data": str(site), "require-privacy": "dp"},
        "hospital-a",
    )
    assert "require-privacy='dp'" in cmd[cmd.index("--node-config") + 1]
    with pytest.raises(ConfigError, match="require-privacy=dpp"):
        supernode_command(
            {
                "superlink": "h:8000",
                "insecure": "true",
                "data": str(site),
                "require-privacy": "dpp",
            },
            "hospital-a",
        )


def test_site_cache_dir_wins_over_the_coordinators(tmp_path, tiny_sites):
    site_cache = tmp_path / "site-cache"
    cmd = supernode_command(
        {
            "superlink": "h:1",
            "insecure": "true",
            "data": str(tiny_sites[0]),
            "cache-dir": str(site_cache),
        },
        "hospital-a",
    )
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f"cache-dir='{site_cache}'" in node_config
    run_config = {"overrides": f"model=tiny data.cache_dir={tmp_path / 'coordinator-cache'}"}

    def context(node_config):
        return Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
        )

    node = {"data-path": str(tiny_sites[0]), "site-name": "hospital-a"}
    run = SiteRun.open(context({**node, "cache-dir": str(site_cache)}))
    assert run.cfg.data.cache_dir == str(site_cache)
    assert cache_folder(run.site.root, run.cfg.data.cache_dir) == site_cache
    # without the site's key the coordinator's setting is still ignored: the site's default
    assert SiteRun.open(context(node)).cfg.data.cache_dir is None


def test_client_refuses_unwritable_cache_or_log_dir(tmp_path, tiny_sites, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = ["superlink=127.0.0.1:1", "insecure=true", f"data={tiny_sites[0]}"]
    assert client_main([*base, f"cache-dir={blocker}/cache"]) == 2
    assert "cache-dir=" in capsys.readouterr().err
    assert client_main([*base, f"log-dir={blocker}/logs"]) == 2
    assert "log-dir=" in capsys.readouterr().err


REFUSED = r"""
import sys
print("\x1b[91mERROR \x1b[0m:     Exit Code: 305", flush=True)
print("[code: 2004] Failed to activate SuperNode.", flush=True)
sys.exit(1)
"""

WRONG_CA = r"""
import sys
print("Exit Code: 305 ... [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", flush=True)
sys.exit(1)
"""
# A SuperNode stand-in that counts the SIGTERMs it gets (Flower's handler runs only once).
SLEEPER = r"""
import signal, sys, time
path = sys.argv[1]
def bye(*_):
    with open(path, "a") as f:
        f.write("TERM\n")
    time.sleep(0.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("SuperNode up", flush=True)
while True:
    time.sleep(0.1)
"""


def _client_loggers(tmp_path):
    settings = LogSettings(tmp_path / "logs")
    return file_logger(settings, "m2diff-client"), file_logger(settings, "supernode")


def test_client_retries_a_refused_supernode_then_gives_up(tmp_path, capsys):
    log, node_log = _client_loggers(tmp_path)
    code = run_supernode(
        [sys.executable, "-c", REFUSED], {}, log, node_log, join_timeout=1.5, retry_s=0.3
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "starting it again in 0 s (305: key not registered yet" in err
    assert "giving up after 2 s" in err
    assert (
        code == 3 and (tmp_path / "logs" / "supernode.log").read_text().count("Exit Code: 305") >= 2
    )
    # a wrong CA is not retried
    assert run_supernode([sys.executable, "-c", WRONG_CA], {}, log, node_log, join_timeout=60) == 1
    assert "not retrying" in capsys.readouterr().err
    close_logger(log)
    close_logger(node_log)


def test_client_stop_sends_the_supernode_one_sigterm(tmp_path):
    import os
    import signal
    import threading
    import time

    log, node_log = _client_loggers(tmp_path)
    marks = tmp_path / "terms"

    def stop_soon():
        deadline = time.monotonic() + 30
        while "SuperNode up" not in (tmp_path / "logs" / "supernode.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # what `docker stop` does to the entry point

    threading.Thread(target=stop_soon, daemon=True).start()
    assert run_supernode([sys.executable, "-c", SLEEPER, str(marks)], {}, log, node_log) == 0
    assert marks.read_text() == "TERM\n"
    assert "stop requested" in (tmp_path / "logs" / "m2diff-client.log").read_text()
    close_logger(log)
    close_logger(node_log)
