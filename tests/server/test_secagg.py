"""Secure aggregation (SecAgg+): the coordinator gets the mean update, never one site's.

Runs Flower's SecAgg+ workflow (server/secagg.py) against the real ClientApp
(client/app.py with secaggplus_mod) of three real tiny sites. The transport is
``LoopbackGrid``: it delivers each message to the destination site's ClientApp with that
site's own Context, the way a SuperNode would, and keeps a copy of everything sent both
ways so the test can look at what the coordinator received. The same protocol over real
SuperLink/SuperNode processes runs in tests/e2e/test_deployment.py.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from client.secagg import SecAggUpdateError, update_of
from m2diff.config import compose
from m2diff.fedutil import array_spec
from m2diff.model import build_model
from server.secagg import SecureTrainPhase, check_secagg
from server.strategy import build_strategy

OVERRIDES = "model=tiny train.steps=2 train.batch_size=2 sample.steps=2 device=cpu fl.min_sites=3"
NODES = (11, 22, 33)


class LoopbackGrid:
    """Flower's Grid, in process: message -> destination site's ClientApp -> reply."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.replies: list[Message] = []
        self._ids = itertools.count(1)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        out = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            meta = Metadata(run_id=1, message_id=f"m{next(self._ids)}", src_node_id=0,
                            dst_node_id=dst, reply_to_message_id="", group_id=msg.metadata.group_id,
                            created_at=time.time(), ttl=600.0, message_type=msg.metadata.message_type)
            reply = app(Message(content=copy.deepcopy(msg.content), metadata=meta), self.contexts[dst])
            assert not reply.has_error(), reply.error.reason
            reply = Message(content=copy.deepcopy(reply.content), metadata=reply.metadata)
            self.replies.append(reply)
            out.append(reply)
        return out


def _site_contexts(tiny_sites, overrides: str) -> dict[int, Context]:
    """Each site's Context, as its SuperNode would hand it to the ClientApp."""
    return {nid: Context(run_id=1, node_id=nid, node_config={"data-path": str(site)},
                         state=RecordDict(), run_config={"overrides": overrides, "out-dir": ""})
            for nid, site in zip(NODES, tiny_sites, strict=True)}


def _server_context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _plain_train(arrays: ArrayRecord, context: Context, rnd: int) -> ArrayRecord:
    meta = Metadata(run_id=1, message_id="plain", src_node_id=0, dst_node_id=context.node_id,
                    reply_to_message_id="", group_id=str(rnd), created_at=time.time(), ttl=600.0,
                    message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
    reply = app(Message(content=content, metadata=meta), copy.deepcopy(context))
    assert not reply.has_error(), reply.error.reason
    return reply.content["arrays"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def secure_round(tiny_sites):
    # What a ServerApp process has set when strategies build messages.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield _secure_round(tiny_sites)
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def _secure_round(tiny_sites):
    # max_weight near the tiny sites' slice counts, as the config advises: resolution.
    cfg = compose(OVERRIDES.split() + ["fl.secagg.enabled=true", "fl.secagg.max_weight=64"])
    check_secagg(cfg)
    model = build_model(cfg.model)
    arrays = ArrayRecord(model.state_dict())
    contexts = _site_contexts(tiny_sites, OVERRIDES)
    # What each site's update is: the same round trained the plain way (seeded per round).
    trained = {nid: _plain_train(arrays, ctx, rnd=1) for nid, ctx in contexts.items()}
    updates = {nid: update_of(arrays, trained[nid], str(nid)) for nid in NODES}
    grid = LoopbackGrid(contexts)
    strategy = build_strategy(cfg.fl, array_spec({k: a.numpy() for k, a in arrays.items()}))
    phase = SecureTrainPhase(strategy, strategy, _server_context(), cfg.fl.secagg, timeout=60.0)
    new = phase(1, arrays, grid, ConfigRecord())  # type: ignore[arg-type]
    return cfg, arrays, updates, grid, strategy, new


def test_secure_mean_is_the_weighted_mean_of_the_updates(secure_round):
    cfg, arrays, updates, _, strategy, new = secure_round
    assert new is not None
    assert len(strategy.train_metrics[1]) == 3
    # Sites are named after their folders; map node -> weight through the names they sent.
    by_node = {nid: strategy.train_metrics[1][strategy.site_name(nid)]["num-examples"] for nid in NODES}
    assert all(w > 0 for w in by_node.values())
    total = sum(by_node.values())
    sa = cfg.fl.secagg
    resolution = 2 * float(sa.clipping_range) / int(sa.quantization_range) / \
        sum(w / float(sa.max_weight) for w in by_node.values())
    worst = 0.0
    for i, key in enumerate(arrays.keys()):
        expected = arrays[key].numpy() + sum(by_node[n] * updates[n][i] for n in NODES) / total
        worst = max(worst, float(np.abs(new[key].numpy() - expected).max()))
    biggest = max(float(np.abs(u).max()) for n in NODES for u in updates[n])
    assert biggest > 100 * resolution  # the updates are not lost in quantisation
    assert worst <= 4 * resolution, (worst, resolution)


def test_coordinator_receives_no_single_update(secure_round):
    cfg, _, updates, grid, strategy, _ = secure_round
    sa = cfg.fl.secagg
    target = int(sa.quantization_range)
    masked = []
    for reply in grid.replies:
        # No weights in the clear in any stage's reply.
        for record in reply.content.array_records.values():
            assert len(record) == 0
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:
            masked.append((reply.metadata.src_node_id, configs[Key.MASKED_PARAMETERS]))
    assert sorted(n for n, _ in masked) == sorted(NODES)
    from flwr.common import bytes_to_ndarray

    for node, vectors in masked:
        got = np.concatenate([bytes_to_ndarray(b).ravel() for b in vectors])
        # What the vector would be unmasked: the site's quantised weighted update.
        weight = strategy.train_metrics[1][strategy.site_name(node)]["num-examples"]
        ratio = round(weight / float(sa.max_weight) * target) / target
        clear = np.concatenate([q.ravel() for q in quantize(
            [u * ratio for u in updates[node]], float(sa.clipping_range), target)])
        assert got.size == clear.size + 1  # + the weight factor
        assert len(np.unique(clear)) > 100  # a real update, not a constant
        # Unmasked, the vector would equal it up to Flower's stochastic rounding (+-1); masked,
        # hardly any entry comes near it.
        near = np.abs(got[1:].astype(np.int64) - clear.astype(np.int64)) <= 1
        assert near.mean() < 0.01
        # Masks are uniform over the modulus: the masked values spread over it.
        assert got.max() > int(sa.quantization_range)


class FailingSiteGrid(LoopbackGrid):
    """LoopbackGrid where site ``node`` fails ``stage`` of the protocol: it answers with an
    error (its ClientApp raised) or, with ``silent``, not at all (it went offline)."""

    def __init__(self, contexts: dict[int, Context], node: int, stage: str, silent: bool) -> None:
        super().__init__(contexts)
        self.node, self.stage, self.silent = node, stage, silent

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        configs = messages[0].content.config_records.get(RECORD_KEY_CONFIGS) if messages else None
        if configs is None or configs.get(Key.STAGE) != self.stage:
            return super().send_and_receive(messages, timeout=timeout)
        out = super().send_and_receive([m for m in messages if m.metadata.dst_node_id != self.node],
                                       timeout=timeout)
        if not self.silent:
            meta = Metadata(run_id=1, message_id="failed", src_node_id=self.node, dst_node_id=0,
                            reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                            message_type=MessageType.TRAIN)
            out.append(Message(error=Error(code=0, reason="ClientApp raised ValueError"), metadata=meta))
        return out


@pytest.mark.parametrize("stage, silent", [(Stage.COLLECT_MASKED_VECTORS, False), (Stage.UNMASK, True)])
def test_one_failing_site_leaves_the_mean_of_the_others_and_is_named(tiny_sites, caplog, stage, silent):
    """Three sites, reconstruction threshold 2 of 3 (the default 0.67): a site that fails the
    masked-vector stage (its update never arrives) or goes silent before unmasking (the others
    reveal its mask) costs the round nothing but its own update, and the coordinator's log
    says which site failed which way."""
    cfg = compose(OVERRIDES.split() + ["fl.secagg.enabled=true", "fl.secagg.max_weight=64"])
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        arrays = ArrayRecord(build_model(cfg.model).state_dict())
        contexts = _site_contexts(tiny_sites, OVERRIDES)
        strategy = build_strategy(cfg.fl, array_spec({k: a.numpy() for k, a in arrays.items()}))
        phase = SecureTrainPhase(strategy, strategy, _server_context(), cfg.fl.secagg, timeout=60.0)
        with caplog.at_level(logging.WARNING, logger="flwr"):
            new = phase(1, arrays, FailingSiteGrid(contexts, NODES[2], stage, silent),
                        ConfigRecord())  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
    assert new is not None, caplog.text
    assert any(not np.array_equal(new[k].numpy(), arrays[k].numpy()) for k in arrays)
    # Named as the coordinator knows it at that stage: its site name, or its node id before
    # the site has sent its name (it arrives with the train metrics).
    how = "no answer to a stage from" if silent else "answered a stage with an error"
    names = (strategy.site_name(NODES[2]), f"node-{NODES[2]}")
    lines = [r.getMessage() for r in caplog.records if how in r.getMessage()]
    assert len(lines) == 1 and any(n in lines[0] for n in names), caplog.text
    assert not any(n in lines[0] for n in (strategy.site_name(NODES[0]), strategy.site_name(NODES[1])))
    if stage == Stage.COLLECT_MASKED_VECTORS:  # its update is not in the mean: not reported trained
        assert sorted(strategy.train_metrics[1]) == sorted(strategy.site_name(n) for n in NODES[:2])


def test_site_refuses_to_send_a_broken_update():
    received = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    with pytest.raises(SecAggUpdateError, match="site A: update of w is not finite"):
        update_of(received, ArrayRecord({"w": Array(np.full((2, 2), np.nan, np.float32))}), "A")
    with pytest.raises(SecAggUpdateError, match="site A: w has shape"):
        update_of(received, ArrayRecord({"w": Array(np.zeros((3, 2), np.float32))}), "A")


@pytest.mark.parametrize("override, message", [
    ("fl.strategy=fedmedian", "fl.strategy"),
    ("fl.min_sites=1", "fl.min_sites"),
    ("privacy=central_dp", "privacy.side=client"),
])
def test_settings_secagg_cannot_serve_are_refused(override, message):
    cfg = compose(["fl.secagg.enabled=true", override])
    with pytest.raises(ValueError, match=message):
        check_secagg(cfg)
    cfg = compose(["fl.secagg.enabled=true", "privacy=central_dp", "privacy.side=client"])
    check_secagg(cfg)


def test_client_level_dp_on_top_noises_the_secure_mean(tiny_sites):
    """``privacy=central_dp side=client``: sites clip before masking, the server noises the
    unmasked mean with Flower's std and counts one release in the client-level ledger."""
    from server.privacy import ClientLevelAccountant, wrap_central_dp

    overrides = OVERRIDES + (" privacy=central_dp privacy.side=client privacy.noise_multiplier=0.5"
                             " privacy.allow_noise_dominated=true"
                             " privacy.clipping_norm=0.001 fl.secagg.enabled=true")
    cfg = compose(overrides.split())
    check_secagg(cfg)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        arrays = ArrayRecord(build_model(cfg.model).state_dict())
        contexts = _site_contexts(tiny_sites, overrides)
        strategy = build_strategy(cfg.fl, array_spec({k: a.numpy() for k, a in arrays.items()}))
        ledger = ClientLevelAccountant(float(cfg.privacy.delta))
        runner = wrap_central_dp(strategy, cfg.privacy, cfg.fl, ledger)
        phase = SecureTrainPhase(runner, strategy, _server_context(), cfg.fl.secagg, timeout=60.0, noise=runner)
        new = phase(1, arrays, LoopbackGrid(contexts), ConfigRecord())  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
    assert new is not None and len(ledger.history) == 1 and ledger.epsilon() > 0
    # Updates clipped to L2 norm 0.001 move the model by almost nothing: what is left is the
    # noise, std 0.5 * 0.001 / 3 per weight.
    change = np.concatenate([(new[k].numpy() - arrays[k].numpy()).ravel() for k in arrays])
    assert abs(float(change.std()) / (0.5 * 0.001 / 3) - 1) < 0.05
