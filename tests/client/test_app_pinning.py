"""The site pins the app it runs (client/app_pinning.py, m2diff-client allow-fab=).

The real SuperNode / flwr run path is tests/e2e/test_deployment.py (a pinned m2diff-client
trains our app and refuses a hostile one); here: the hash is Flower's and reproducible, the
allow-list check in front of Flower's ClientApp runtime, and m2diff-client's keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

from client import app_pinning
from client.cli import main as client_main
from client.cli import supernode_command
from tests.flower_procs import REPO

HOSTILE = REPO / "tests" / "e2e" / "hostile_app"


def test_fab_hash_is_flowers_and_reproducible(tmp_path, capsys):
    digest = app_pinning.app_hash(HOSTILE)
    assert digest == hashlib.sha256(build_fab_from_disk(HOSTILE)).hexdigest()  # what flwr run sends
    copy = tmp_path / "elsewhere" / "hostile-copy"
    shutil.copytree(HOSTILE, copy)
    later = time.time() + 3600
    for path in copy.rglob("*"):
        os.utime(path, (later, later))  # other timestamps, other folder: the same bytes
    assert app_pinning.app_hash(copy) == digest
    assert client_main(["fab-hash", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"sha256:{digest}"
    (copy / "hostile" / "client.py").write_text("# changed\n")
    assert app_pinning.app_hash(copy) != digest
    assert client_main(["fab-hash", str(tmp_path)]) == 2  # no pyproject.toml


def test_allow_list_words():
    a, b = "a" * 64, "0123456789abcdef" * 4
    assert app_pinning.parse_allow(f"sha256:{a.upper()}, {b}\n# a comment\n\n") == {a, b}
    with pytest.raises(ValueError, match="not a sha256"):
        app_pinning.parse_allow("sha256:abc")


def _task(content: bytes, announced: str | None = None):
    meta = Metadata(run_id=5, message_id="m1", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                    message_type=MessageType.TRAIN)
    message = Message(content=RecordDict({"c": ConfigRecord({"x": 1})}), metadata=meta)
    fab = Fab(announced or hashlib.sha256(content).hexdigest(), content, {})
    return message, SimpleNamespace(run_id=5), SimpleNamespace(run_id=5), fab


def test_the_runtime_refuses_an_app_before_it_is_installed(monkeypatch):
    from flwr.supernode.runtime import run_clientapp as runtime

    pushed = []
    monkeypatch.setattr(runtime, "push_message", lambda client, msg, ctx: pushed.append(msg))
    good, bad = b"the vetted release", b"something else"
    monkeypatch.setenv(app_pinning.ALLOW_ENV, hashlib.sha256(good).hexdigest())
    pull = app_pinning._checked_pull(lambda client: _task(good))
    assert pull(None)[3].content == good and not pushed  # allowed: handed to Flower unchanged
    for task in (_task(bad),  # another app
                 _task(bad, announced=hashlib.sha256(good).hexdigest())):  # a false hash_str
        with pytest.raises(app_pinning.AppNotAllowed):
            app_pinning._checked_pull(lambda client, t=task: t)(None)
    assert [(m.error.code, m.error.reason) for m in pushed] == [(7, "site-app-not-allowed")] * 2
    assert all(m.metadata.reply_to_message_id == "m1" for m in pushed)
    monkeypatch.delenv(app_pinning.ALLOW_ENV)  # no allow-list: nothing runs
    with pytest.raises(app_pinning.AppNotAllowed):
        pull(None)


def test_client_requires_a_pinned_app_or_an_explicit_any(tmp_path, tiny_sites, capsys):
    site = tmp_path / "site"
    shutil.copytree(tiny_sites[0], site)
    base = ["superlink=127.0.0.1:1", "insecure=true", f"data={site}", "join-timeout=0"]
    assert client_main(base) == 2
    assert "m2diff-client fab-hash" in capsys.readouterr().err
    assert client_main([*base, "allow-fab=1234"]) == 2
    assert client_main([*base, "max-steps=zero", "allow-fab=any"]) == 2
    assert "max-steps" in capsys.readouterr().err
    secret = tmp_path / "s"
    cmd = supernode_command({"superlink": "h:1", "insecure": "true", "data": str(site),
                             "state-dir": str(tmp_path / "st"), "max-epsilon": "3"}, "a", secret)
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    node = cmd[cmd.index("--node-config") + 1]
    assert f"state-dir='{tmp_path / 'st'}'" in node and "max-epsilon='3'" in node
