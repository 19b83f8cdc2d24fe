"""One site cannot poison or kill the run: each attack through the real ServerApp.

``server.app.app`` (the ServerApp Flower runs) is called in process with ``ReplyGrid``, a
Grid whose sites answer every message the way a ClientApp would: three honest sites send
``global + a small seeded update`` with their weights, and one attacker sends, round by
round, one of the replies that a security review found to poison the average or crash the
ServerApp (a weight of 1e15 or -199 or one that cancels the others, a finite 3e38 update,
string / complex arrays, an outlier update, another site's name, a name full of markup,
an infinite metric, packed weights that do not unpack). Eleven attackers, one per attack, join three honest sites for two rounds:
after every round the global model must be exactly the honest sites' weighted mean applied
to the previous global model (every attacker dropped, nothing lost), each attacker's rows in
rounds.json must say why, and the run must complete. A run in which no site trains fails
with the reasons.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from m2diff.transport import decode, encode
from m2diff.wire import TRANSPORT_RECORD
from server.app import NothingTrained, app

OVERRIDES = "model=tiny fl.rounds={rounds} fl.min_sites={sites} device=cpu"
HONEST = {1: ("h-a", 10), 2: ("h-b", 20), 3: ("h-c", 30)}  # node -> (site name, num-examples)

Reply = Callable[[int, dict[str, np.ndarray]], RecordDict | None]


def _delta(node: int, rnd: int, arrays: dict[str, np.ndarray], scale: float = 1e-3
           ) -> dict[str, np.ndarray]:
    """A site's honest update of one round: small, seeded, float32."""
    rng = np.random.default_rng(1000 * rnd + node)
    return {k: (scale * rng.standard_normal(a.shape)).astype(a.dtype) for k, a in arrays.items()}


def _train_content(name: str, arrays: dict[str, np.ndarray], weight: object,
                   extra: dict | None = None) -> RecordDict:
    metrics = {"num-examples": weight, "train_loss": 0.5, "train_steps": 2}
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({**metrics, **(extra or {})}),
        "site": ConfigRecord({"name": name}),
    })


def _evaluate_content(name: str) -> RecordDict:
    return RecordDict({
        "metrics": MetricRecord({"num-examples": 1, "all_psnr": 20.0, "all_n": 1, "cn_psnr": 20.0,
                                 "cn_n": 1, "ld_all_psnr": 25.0, "ld_cn_psnr": 25.0}),
        "site": ConfigRecord({"name": name}),
    })


def honest(node: int) -> Reply:
    name, weight = HONEST[node]

    def reply(rnd: int, arrays: dict[str, np.ndarray]) -> RecordDict:
        delta = _delta(node, rnd, arrays)
        return _train_content(name, {k: a + delta[k] for k, a in arrays.items()}, weight)
    return reply


def _first_float_key(arrays: dict[str, np.ndarray]) -> str:
    return next(k for k, a in arrays.items() if a.dtype == np.float32 and a.size > 1)


def _shifted(arrays: dict[str, np.ndarray], rnd: int, scale: float) -> dict[str, np.ndarray]:
    delta = _delta(0, rnd, arrays, scale)
    return {k: a + delta[k] for k, a in arrays.items()}


def _retyped(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    key = _first_float_key(arrays)
    return {**arrays, key: arrays[key].astype(dtype)}


def _huge(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = _first_float_key(arrays)
    return {**arrays, key: np.full_like(arrays[key], 3e38)}  # finite float32


def _short_packed(name: str, arrays: dict[str, np.ndarray]) -> RecordDict:
    """A packed reply (m2diff/transport.py) whose vector is one value short of its manifest."""
    packed, manifest = encode(arrays, "float16")
    content = _train_content(name, {"flat": packed["flat"][:-1]}, 10)
    content[TRANSPORT_RECORD] = ConfigRecord(manifest)
    return content


def received(msg: Message) -> dict[str, np.ndarray]:
    """The weights a message carries, as a site's ClientApp sees them (packed ones unpacked)."""
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    record = msg.content.config_records.get(TRANSPORT_RECORD)
    return decode(arrays, record)[0] if record is not None else arrays


def _attack(send: Callable[[str, int, dict], RecordDict]) -> Callable[[str], Reply]:
    return lambda name: (lambda rnd, arrays: send(name, rnd, arrays))


# attacker node -> (its reply, what its rejection must say); node 100 + k is site "evil-k"
ATTACKS: dict[int, tuple[Callable[[str], Reply], str]] = {
    101: (_attack(lambda n, r, a: _train_content(n, _shifted(a, r, 1e-3), 1e15)), "not an integer"),
    102: (_attack(lambda n, r, a: _train_content(n, _shifted(a, r, 1e-3), -199)),
          "outside 1..1000000"),
    # weights summing to 0 with the honest ones (10 + 20 + 30): FedAvg divided by zero
    103: (_attack(lambda n, r, a: _train_content(n, _shifted(a, r, 1e-3), -60)),
          "outside 1..1000000"),
    104: (_attack(lambda n, r, a: _train_content(n, _huge(a), 10)), "x the global model's norm"),
    105: (_attack(lambda n, r, a: _train_content(n, _retyped(a, "<U8"), 10)), "dtype <U8 != float32"),
    106: (_attack(lambda n, r, a: _train_content(n, _retyped(a, "complex64"), 10)), "dtype complex64"),
    # finite and within 100 x the model's norm, but 500 x the honest updates: the median rule
    107: (_attack(lambda n, r, a: _train_content(n, _shifted(a, r, 0.5), 10)), "x the round's median"),
    108: (_attack(lambda n, r, a: _train_content("h-a", _shifted(a, r, 1e-3), 10)),
          "registered as 'evil-8'"),
    109: (_attack(lambda n, r, a: _train_content("[/bold]", _shifted(a, r, 1e-3), 10)),
          "is not 1-64 characters"),
    110: (_attack(lambda n, r, a: _train_content(n, _shifted(a, r, 1e-3), 10,
                                                 {"train_loss": float("inf")})),
          "non-finite metric train_loss"),
    111: (_attack(lambda n, r, a: _short_packed(n, a)), "missing arrays"),
}
NAMES = {**{n: name for n, (name, _) in HONEST.items()}, **{n: f"evil-{n - 100}" for n in ATTACKS}}
REGISTERED = " ".join(f"{n}={name}" for n, name in NAMES.items())


class ReplyGrid:
    """The ServerApp's Grid, in process: each node answers with ``sites[node](round, arrays)``
    for train messages and a fixed metric reply for evaluate messages."""

    def __init__(self, sites: dict[int, Reply]) -> None:
        self.sites = sites
        self.sent: list[Message] = []
        self._ids = itertools.count(1)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if msg.metadata.message_type == "train":
                rnd = int(msg.content["config"]["server-round"])
                content = self.sites[node](rnd, received(msg))
            else:
                content = _evaluate_content(NAMES[node])
            if content is not None:
                out.append(Message(content, reply_to=msg))
        return out


@pytest.fixture(autouse=True)
def _server_identity():
    """What a ServerApp process has set when strategies build messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def _context(out: Path, rounds: int, sites: int) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config={"out-dir": str(out), "registered-sites": REGISTERED,
                               "overrides": OVERRIDES.format(rounds=rounds, sites=sites)})


def _weights(out: Path) -> dict[str, np.ndarray]:
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    return {k: v.numpy() for k, v in ckpt["model"].items()}


def test_every_attack_is_dropped_and_the_run_goes_on(tmp_path):
    rounds = 2
    sites: dict[int, Reply] = {n: honest(n) for n in HONEST}
    sites.update({n: make(NAMES[n]) for n, (make, _) in ATTACKS.items()})
    globals_: dict[int, dict[str, np.ndarray]] = {}

    class Recording(ReplyGrid):
        """Also keeps the global model each round's training starts from."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                rnd = int(messages[0].content["config"]["server-round"])
                globals_[rnd] = received(messages[0])
            return super().send_and_receive(messages, timeout=timeout)

    out = tmp_path / "out"
    app(Recording(sites), _context(out, rounds, len(sites)))  # type: ignore[arg-type]

    total = sum(w for _, w in HONEST.values())
    final = _weights(out)
    for rnd in range(1, rounds + 1):
        start = globals_[rnd]
        deltas = {n: _delta(n, rnd, start) for n in HONEST}
        expected = {k: a + sum(w * deltas[n][k] for n, (_, w) in HONEST.items()) / total
                    for k, a in start.items()}
        got = globals_.get(rnd + 1, final)
        for k in start:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"round {rnd}: global model {k} moved by an attacker")
    rows = json.loads((out / "rounds.json").read_text())
    assert sorted({r["round"] for r in rows}) == list(range(1, rounds + 1))
    for rnd in range(1, rounds + 1):
        these = [r for r in rows if r["round"] == rnd]
        for node, (_, why) in ATTACKS.items():
            mine = [r for r in these if r["site"] == NAMES[node]]  # named by its registered key
            assert mine and all(why in r.get("rejected", "") for r in mine), (node, why, mine)
            assert all("train_loss" not in r for r in mine)
        good = [r for r in these if r["site"] in ("h-a", "h-b", "h-c")]
        assert {r["site"] for r in good} == {"h-a", "h-b", "h-c"}
        assert all("train_loss" in r and "rejected" not in r and r["global_updated"] == 1 for r in good)


def test_a_run_in_which_no_site_trained_fails_and_says_why(tmp_path):
    def refusing(node: int) -> Reply:
        name, weight = HONEST[node]
        return lambda rnd, arrays: _train_content(name, arrays, weight,
                                                  {"dp_epsilon": 0.0, "dp_refused": 1})

    sites: dict[int, Reply] = {n: refusing(n) for n in HONEST}
    sites[101] = lambda rnd, arrays: _train_content("evil-1", arrays, -5)
    out = tmp_path / "out"
    with pytest.raises(NothingTrained) as err:
        app(ReplyGrid(sites), _context(out, 2, len(sites)))  # type: ignore[arg-type]
    text = str(err.value)
    assert "no site trained in any of rounds 1..2" in text
    assert "refused to train (privacy budget): h-a, h-b, h-c" in text and "rejected: evil-1" in text
    rows = json.loads((out / "rounds.json").read_text())  # the rounds are still recorded
    assert {r["round"] for r in rows} == {1, 2} and all(r["global_updated"] == 0 for r in rows)
