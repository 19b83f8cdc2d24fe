"""Nothing but weights and aggregate numbers leaves a site.

Runs the real ClientApp (train and evaluate) on a real tiny site with a constructed
Message and Context, then inspects every reply: its records, and the serialized bytes
Flower would send (every nested object deflated). Both ways weights can arrive: as the
coordinator sends them (packed by server/transport.py, float16 here) and plain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.app import app
from m2diff.data.validate import validate_site
from m2diff.model import build_model
from m2diff.transport import decode, encode
from m2diff.wire import TRANSPORT_RECORD
from server.transport import Traffic, _pack_all

OVERRIDES = "model=tiny train.steps=2 train.batch_size=2 sample.steps=2 device=cpu"


def _message(arrays: ArrayRecord, kind: str) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=0.0, ttl=600.0,
                    message_type=kind)
    return Message(content=content, metadata=meta)


def _serialized(msg: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


@pytest.fixture(scope="module", params=["packed", "plain"])
def replies(request, tiny_sites, tiny_cfg):
    site_dir = tiny_sites[1]  # AD-heavy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: the default oversubscribes them
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    arrays = ArrayRecord(model.state_dict())
    ctx = Context(run_id=1, node_id=7, node_config={"data-path": str(site_dir)},
                  state=RecordDict(), run_config={"overrides": OVERRIDES, "out-dir": ""})
    try:
        out = {}
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            msg = _message(arrays, kind)
            if request.param == "packed":
                (msg,) = _pack_all([msg], "float16", Traffic())
            out[kind] = app(msg, ctx)
    finally:
        torch.set_num_threads(threads)
    return site_dir, model, out


def test_replies_carry_only_weights_numbers_and_site_name(replies):
    site_dir, model, out = replies
    site, _ = validate_site(site_dir)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    forbidden = [s.id for s in site.subjects] + [str(site_dir), "nii", "participants"]
    forbidden += [p.name for s in site.subjects for p in (s.t1, s.ld, s.sd) if p is not None]
    for kind, reply in out.items():
        assert not reply.has_error(), f"{kind}: {reply.error.reason if reply.has_error() else ''}"
        content = reply.content
        # Records: one metric record of numbers, the site-name config record, weights for
        # train (packed like they came: then a manifest of the model's own names beside them).
        packed = TRANSPORT_RECORD in content.config_records
        assert set(content.config_records) - {TRANSPORT_RECORD} == {"site"}
        assert dict(content["site"]) == {"name": site.name}
        assert len(content.metric_records) == 1
        metrics = dict(next(iter(content.metric_records.values())))
        assert all(isinstance(v, int | float) and np.isfinite(v) for v in metrics.values())
        assert metrics["num-examples"] > 0
        if kind == MessageType.TRAIN:
            assert len(content.array_records) == 1
            record = next(iter(content.array_records.values()))
            state = ({k: a.numpy() for k, a in record.items()} if not packed else
                     decode({k: a.numpy() for k, a in record.items()}, content[TRANSPORT_RECORD])[0])
            assert {k: tuple(a.shape) for k, a in state.items()} == expected
            if packed:  # as it came: one float16 vector
                assert set(record) == {"flat"} and record["flat"].numpy().dtype == np.float16
        else:
            assert not packed
            assert not content.array_records
            assert {"cn_psnr", "ad_psnr", "all_psnr", "ld_all_psnr", "cn_n", "ad_n"} <= set(metrics)
        blob = _serialized(reply)
        for word in forbidden:
            assert word.encode() not in blob, f"{kind} reply contains {word!r}"


def test_train_reply_moves_the_weights(replies):
    _, model, out = replies
    content = out[MessageType.TRAIN].content
    record = next(iter(content.array_records.values()))
    state = {k: a.numpy() for k, a in record.items()}
    before = {k: v.numpy() for k, v in model.state_dict().items()}
    if TRANSPORT_RECORD in content.config_records:
        state, transport = decode(state, content[TRANSPORT_RECORD])
        assert transport == "float16"
        before = decode(*encode(before, "float16"))[0]  # what the site received
    assert any(not np.allclose(state[k], before[k], rtol=0, atol=1e-5) for k in before)
