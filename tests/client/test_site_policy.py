"""The coordinator's run config is untrusted at the site (client/site_policy.py): the attacks
found in review, run through the real ClientApp on a real tiny site, are refused or ignored,
and an error reply carries a fixed code, never the exception's text."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.app import app
from client.site import SiteRun
from client.site_errors import SitePolicyError
from client.site_policy import SitePolicy, check_noise, check_overrides, site_config
from m2diff.config import compose
from m2diff.model import build_model
from m2diff.runconfig import run_overrides

BASE = "model=tiny train.steps=2 train.batch_size=2 sample.steps=2"
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def arrays(tiny_cfg) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(tiny_cfg.model).state_dict())


def _send(site, arrays: ArrayRecord, overrides: str, kind: str = MessageType.TRAIN,
          **node: str) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=0.0, ttl=600.0,
                    message_type=kind)
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  metadata=meta)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={"overrides": overrides},
                  node_config={"data-path": str(site), **{k.replace("_", "-"): v for k, v in node.items()}})
    return app(msg, ctx)


def _blob(msg: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def test_an_environment_variable_does_not_leave_the_site(tiny_sites, arrays, monkeypatch):
    monkeypatch.setenv("M2DIFF_TEST_SECRET", "hunter2-at-the-hospital")
    for attack in ("device=${oc.env:M2DIFF_TEST_SECRET,cpu}",
                   "model.arch=${oc.env:M2DIFF_TEST_SECRET}",
                   "++seed='${oc.env:M2DIFF_TEST_SECRET}'"):
        reply = _send(tiny_sites[1], arrays, f"{BASE} {attack}")
        assert reply.has_error() and reply.error.reason == "site-policy", attack
        assert b"hunter2" not in _blob(reply) and b"M2DIFF_TEST_SECRET" not in _blob(reply)


def test_hydra_searchpath_and_other_syntax_are_refused(tiny_sites, tmp_path, arrays):
    evil = tmp_path / "evil"
    (evil / "model").mkdir(parents=True)
    (evil / "model" / "evil.yaml").write_text("arch: unet\n")
    for attack in (f"hydra.searchpath=[file://{evil}]", "+model.extra=1", "~train.lr",
                   "model@train=tiny", "model=evil", "train.steps=choice(1,2)",
                   "not.a.key=1", "data.nope=1", "train.steps=2,3"):
        reply = _send(tiny_sites[1], arrays, f"{BASE} {attack}")
        assert reply.has_error() and reply.error.reason == "site-policy", attack
        assert str(tmp_path).encode() not in _blob(reply)


def test_cache_dir_and_split_from_the_coordinator_are_ignored(tiny_sites, tmp_path, arrays):
    site = tmp_path / "site"
    shutil.copytree(tiny_sites[1], site)
    moved = tmp_path / "coordinator-picked"
    reply = _send(site, arrays, f"{BASE} data.cache_dir={moved} data.path=/etc device=cpu")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not moved.exists(), "decoded slices went where the coordinator said"
    assert any((site / ".m2diff-cache").glob("*.npz"))
    # The split is the site's: a one-patient test set cannot be asked for, nor can the seed
    # pick which subjects are tested.
    def tested(overrides: str) -> list[str]:
        ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(site)}, state=RecordDict(),
                      run_config={"overrides": overrides})
        return [s.id for s in SiteRun.open(ctx).subjects("test")]

    own = tested(BASE)
    assert tested(f"{BASE} data.split=[1,0,0.0001]") == own
    assert all(tested(f"{BASE} seed={seed}") == own for seed in (1, 2, 3, 7))
    # The site's own split and minimum still apply.
    reply = _send(site, arrays, BASE, MessageType.EVALUATE, min_split_subjects="3")
    assert reply.has_error() and reply.error.reason == "site-policy"


def test_caps_of_the_site(tiny_sites, arrays):
    reply = _send(tiny_sites[1], arrays, f"{BASE} train.steps=50", max_steps="10")
    assert reply.has_error() and reply.error.reason == "site-policy"
    reply = _send(tiny_sites[1], arrays, BASE, min_batch_size="8")
    assert reply.has_error() and reply.error.reason == "site-policy"
    # A model far larger than the site allows is refused before it is built.
    reply = _send(tiny_sites[1], arrays, f"{BASE} model.channels=[4096,4096,4096]")
    assert reply.has_error() and reply.error.reason == "site-policy"


def test_error_replies_carry_fixed_codes_only(tiny_sites, tmp_path, arrays):
    empty = tmp_path / "sub-secret-patient-id"
    empty.mkdir()
    reply = _send(empty, arrays, BASE)  # no participants.tsv: no usable subject
    assert reply.has_error() and reply.error.reason == "site-data"
    assert b"secret-patient" not in _blob(reply)
    broken = RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 1})})
    meta = Metadata(run_id=1, message_id="x", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={"overrides": BASE},
                  node_config={"data-path": str(tiny_sites[1])})
    reply = app(Message(content=broken, metadata=meta), ctx)  # load_state_dict fails
    assert reply.has_error() and reply.error.reason == "site-error"
    assert str(tiny_sites[1]).encode() not in _blob(reply)


def test_what_m2diff_simulate_and_the_coordinator_send_still_composes():
    """The allow-list keeps the legitimate paths working: ++ words of m2diff simulate and
    the usual coordinator settings; deployed sites ignore the site-owned ones."""
    for words in (["privacy=dp", "privacy.noise_multiplicity=4"], ["privacy=central_dp",
                  "fl.secagg.enabled=true", "fl.strategy=fedprox"], ["model=paper", "train.steps=3"],
                  ["model=unet", "data.image_size=32", "sample.sampler=ddpm", "seed=3"]):
        text = " ".join(run_overrides(compose(words)))
        assert site_config({"overrides": text}, SitePolicy(), virtual=True) == \
            site_config({"overrides": text}, SitePolicy())
        assert compose(words) == site_config({"overrides": " ".join(words)}, SitePolicy())
    text = " ".join(run_overrides(compose(["data.split=[0.5,0.25,0.25]", "device=cpu"])))
    assert check_overrides(text, virtual=True).ignored == []
    assert len(check_overrides(text).ignored) == 2
    cfg = site_config({"overrides": "device=cpu data.cache_dir=/x"},
                      SitePolicy(device="cuda:1", cache_dir="/site/cache", split=(0.6, 0.2, 0.2)))
    assert (cfg.device, cfg.data.cache_dir, list(cfg.data.split)) == \
        ("cuda:1", "/site/cache", [0.6, 0.2, 0.2])
    with pytest.raises(SitePolicyError, match="max-steps"):
        site_config({"overrides": "train.steps=11"}, SitePolicy(max_steps=10))
    with pytest.raises(SitePolicyError, match="min-split"):
        SitePolicy.from_node_config({"min-split-subjects": "0"})
    # A simulated site has no hospital's floors: the researcher's settings go.
    with pytest.raises(SitePolicyError, match="min-noise-multiplier"):
        check_noise(0.1, SitePolicy())
    check_noise(0.1, SitePolicy.virtual())
    site_config({"overrides": "train.steps=20000"}, SitePolicy.virtual(), virtual=True)
    assert os.environ.get("M2DIFF_TEST_SECRET") is None
