"""Coordinator operations without a federation: the command's keys and SuperLink database,
the progress line, ``m2diff-server status`` against a SuperLink that does not answer, the
final table, which failed runs are resubmitted."""

from __future__ import annotations

import json

from m2diff.ops.words import parse_words
from server.cli import KEYS
from server.cli import main as server_main
from server.runstate import RoundLines, print_last_round
from server.superlink import database_path, lost_serverapp, superlink_command
from tests.flower_procs import free_port


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
    progress = RoundLines(tmp_path, 3, lambda text, **_: lines.append(text))
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

    rows = [dict(ROWS[0], site="[/bold]", ld_psnr=19.0), dict(ROWS[1], site="[red]x[/red]")]
    write_json(tmp_path / "rounds.json", rows)
    print_last_round(tmp_path)
    out = capsys.readouterr().out
    assert "[/bold]" in out and "[red]x[/red]" in out


def test_only_a_vanished_serverapp_is_resubmitted():
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

