"""Coordinator / site operations without a federation: rotated log files of a child's output,
the progress line, ``m2diff-server status`` against a SuperLink that does not answer, the
site's own cache folder reaching the ClientApp's config."""

from __future__ import annotations

import io
import json
import sys

from flwr.app import Context, RecordDict

from client.cli import main as client_main
from client.cli import supernode_command
from client.site import SiteRun
from m2diff.data.cache import cache_folder
from server.cli import KEYS, Progress, database_path, parse_words, superlink_command
from server.cli import main as server_main
from server.flwrctl import LogSettings, close_logger, file_logger, start_logged
from tests.flower_procs import free_port

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
    assert "line 0398" in (tmp_path / "logs" / "child.log").read_text() + \
        (tmp_path / "logs" / "child.log.1").read_text()
    # the console gets every line, colours and all, none of the old ones is lost there
    assert echo.getvalue().count("\n") == 401 and "\x1b[92m" in echo.getvalue()
    assert LogSettings.from_args(tmp_path, "0.5", "3").max_bytes == 2**19


def test_keys_database_and_underscore_spelling(tmp_path):
    args, rest = parse_words(["log_dir=/x", "log-backups=2", "fl.rounds=3", "restarts=1"], KEYS)
    assert args == {"log-dir": "/x", "log-backups": "2", "restarts": "1"} and rest == ["fl.rounds=3"]
    out = tmp_path / "out"
    assert database_path({}, out) == out / "superlink-state.db"
    assert database_path({"database": "memory"}, out) is None
    cmd = superlink_command({"insecure": "true", "auth": "false"}, 9000, database_path({}, out))
    assert cmd[cmd.index("--database") + 1] == str(out / "superlink-state.db")
    assert "--database" not in superlink_command({"insecure": "true", "auth": "false"}, 9000, None)
    assert server_main([f"out={tmp_path}/o", "insecure=true", "auth=false", "log-max-mb=0"]) == 2


ROWS = [
    {"round": 1, "site": "hospital-a", "cohort": "CN", "n": 1, "psnr": 20.0, "ssim": 0.5,
     "nmse": 0.1, "suvr_bias": 3.0, "train_loss": 0.9, "round_train_s": 30.0, "round_evaluate_s": 5.0},
    {"round": 1, "site": "hospital-b", "cohort": "AD", "n": 1, "psnr": 18.0, "ssim": 0.4,
     "nmse": 0.2, "suvr_bias": -2.0, "train_loss": 0.8, "round_train_s": 30.0, "round_evaluate_s": 5.0},
    {"round": 2, "site": "hospital-a", "cohort": "CN", "n": 1, "psnr": 21.5, "ssim": 0.55,
     "nmse": 0.09, "suvr_bias": 2.0, "round_train_s": 40.0, "round_evaluate_s": 4.0},
]


def test_progress_line_per_new_round(tmp_path):
    lines: list[str] = []
    progress = Progress(tmp_path, 3, lambda text, **_: lines.append(text))
    progress.check()
    assert lines == []
    (tmp_path / "rounds.json").write_text(json.dumps(ROWS[:2]))
    progress.check()
    progress.check()  # unchanged file: nothing new
    assert len(lines) == 1
    assert lines[0].startswith("round 1/3 done in 35 s: 2 site(s) answered (hospital-a, hospital-b)")
    (tmp_path / "rounds.json").write_text(json.dumps(ROWS))
    progress.check()
    assert lines[1].startswith("round 2/3 done in 44 s: 1 site(s) answered (hospital-a; trained: none)")


def test_status_without_a_superlink_still_shows_the_sites_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rounds.json").write_text(json.dumps(ROWS))
    (out / "server.json").write_text(json.dumps({
        "run_id": 42, "runs": [42], "rounds": 3, "insecure": True, "pid": None,
        "address": f"127.0.0.1:{free_port()}", "status": "running", "nodes": {}}))
    assert server_main(["status", f"out={out}"]) == 1  # nothing answers there
    text = capsys.readouterr().out
    assert "does not answer" in text and "m2diff-server not running" in text
    assert "run 42: running (as m2diff-server last recorded it); round 2/3 done" in text
    # each site's last round: hospital-a from round 2, hospital-b from round 1
    table = text[text.index("Last metrics per site"):]
    assert "hospital-a" in table and "21.50" in table and "hospital-b" in table and "18.00" in table
    assert "20.00" not in table
    assert server_main(["status", f"out={out}", "fl.rounds=2"]) == 2


def test_site_cache_dir_wins_over_the_coordinators(tmp_path, tiny_sites):
    site_cache = tmp_path / "site-cache"
    cmd = supernode_command({"superlink": "h:1", "insecure": "true", "data": str(tiny_sites[0]),
                             "cache-dir": str(site_cache)}, "hospital-a")
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f"cache-dir='{site_cache}'" in node_config
    run_config = {"overrides": f"model=tiny data.cache_dir={tmp_path / 'coordinator-cache'}"}

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                       run_config=run_config)

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
    from client.cli import run_supernode

    log, node_log = _client_loggers(tmp_path)
    code = run_supernode([sys.executable, "-c", REFUSED], {}, log, node_log, join_timeout=1.5,
                         retry_s=0.3)
    assert code == 3
    err = capsys.readouterr().err
    assert "starting it again in 0 s (305: key not registered yet" in err
    assert "giving up after 2 s" in err
    assert code == 3 and (tmp_path / "logs" / "supernode.log").read_text().count("Exit Code: 305") >= 2
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

    from client.cli import run_supernode

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


def test_status_names_nodes_from_the_sites_own_replies(tmp_path):
    # Without SuperNode auth there are no key names: the ServerApp's sites.json names them.
    from server.status import _node_rows, _reported_sites

    assert _reported_sites(tmp_path) == {}
    (tmp_path / "sites.json").write_text('{"101": "hospital-a", "202": "hospital-b"}')
    nodes = [{"node-id": 101, "status": "online"}, {"node-id": 303, "status": "offline"}]
    rows = _node_rows(nodes, {"303": "hospital-c", **_reported_sites(tmp_path)})
    assert [(r["node id"], r["site"]) for r in rows] == [("101", "hospital-a"), ("303", "hospital-c")]


def test_final_table_prints_a_markup_site_name_as_it_is(tmp_path, capsys):
    """'[/bold]' as a site name once ended m2diff-server's final table (rich parsed it as a
    closing tag); names are plain text now (and the ServerApp refuses such names)."""
    from m2diff.report import write_json
    from server.cli import print_table

    rows = [dict(ROWS[0], site="[/bold]", ld_psnr=19.0), dict(ROWS[1], site="[red]x[/red]")]
    write_json(tmp_path / "rounds.json", rows)
    print_table(tmp_path)
    out = capsys.readouterr().out
    assert "[/bold]" in out and "[red]x[/red]" in out


def test_only_a_vanished_serverapp_is_resubmitted():
    from server.cli import lost_serverapp

    assert lost_serverapp({"status": "finished:failed",
                           "status-details": "No heartbeat received from the task"})
    assert not lost_serverapp({"status": "finished:failed", "status-details":
                               "ServerApp failed with exception: no site trained in any of rounds 1..2"})
    assert not lost_serverapp({"status": "finished:completed", "status-details": ""})
    # Its own SuperLink failed a runtime call (SQLite "database is locked" under load)
    assert lost_serverapp({"status": "finished:failed", "status-details":
                           "ServerApp failed with exception: Server error '500 Internal Server "
                           "Error' for url 'https://127.0.0.1:55349/v1/runtime/pull-messages'\n"
                           "For more information check: https://developer.mozilla.org/"})
    assert not lost_serverapp({"status": "finished:failed", "status-details":
                               "ServerApp failed with exception: Server error '500 x' for url "
                               "'https://evil/v1/other'"})


def test_an_exited_superexec_is_seen(tmp_path):
    """Flower 1.42's SuperLink never restarts its flower-superexec; m2diff-server restarts the
    SuperLink when that child has exited (a zombie of the SuperLink)."""
    import os
    import shutil
    import subprocess
    import time

    from server.flwrctl import exited_children

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
