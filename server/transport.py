"""Packed weights in and out of the ServerApp's rounds (the format: m2diff/transport.py).

``send_packed`` is ``grid.send_and_receive`` with the weights of every outgoing message packed
into one vector of ``fl.transport`` precision and every reply's weights unpacked (widened to
float32) before the strategy sees them: the strategies, the update checks, the DP wrappers
and the checkpoints work on float32 arrays by name as before. It also counts the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from m2diff.transport import PACKED, TransportError, decode, encode
from m2diff.wire import ARRAYS_KEY, TRANSPORT_RECORD


@dataclass
class Traffic:
    """Bytes of weights the coordinator sent and received (message payloads, not HTTP)."""

    sent: int = 0
    received: int = 0

    def add(self, other: Traffic) -> None:
        self.sent += other.sent
        self.received += other.received


def _pack_all(messages: Iterable[Message], transport: str, traffic: Traffic) -> list[Message]:
    out: list[Message] = []
    packed: dict[int, tuple[ArrayRecord, dict[str, str]]] = {}  # Flower shares one record
    for msg in messages:
        content = msg.content
        record = content.array_records.get(ARRAYS_KEY)
        if record is not None and transport in PACKED and \
                TRANSPORT_RECORD not in content.config_records:
            if id(record) not in packed:
                arrays, manifest = encode({k: a.numpy() for k, a in record.items()}, transport)
                packed[id(record)] = (ArrayRecord({k: Array(v) for k, v in arrays.items()}), manifest)
            content[ARRAYS_KEY], manifest = packed[id(record)]
            content[TRANSPORT_RECORD] = ConfigRecord(manifest)
        if ARRAYS_KEY in content.array_records:
            traffic.sent += content.array_records[ARRAYS_KEY].count_bytes()
        out.append(msg)
    return out


def _unpack(reply: Message, traffic: Traffic) -> Message:
    if reply.has_error():
        return reply
    content = reply.content
    record = content.config_records.get(TRANSPORT_RECORD)
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is not None:
        traffic.received += arrays.count_bytes()
    if record is None or arrays is None:
        return reply
    try:
        state, _ = decode({k: a.numpy() for k, a in arrays.items()}, record)
    except (TransportError, ValueError, TypeError) as exc:
        # Left packed: the update checks reject it (names differ) and name the site.
        log(WARNING, "a reply's packed weights do not unpack (%s)", str(exc)[:200])
        return reply
    content[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in state.items()})
    del content[TRANSPORT_RECORD]
    return reply


def send_packed(grid: Grid, messages: Iterable[Message], transport: str, timeout: float,
                traffic: Traffic | None = None) -> list[Message]:
    """``grid.send_and_receive`` with packed weights both ways (see the module doc)."""
    traffic = traffic if traffic is not None else Traffic()
    replies = grid.send_and_receive(messages=_pack_all(messages, transport, traffic),
                                    timeout=timeout)
    return [_unpack(r, traffic) for r in replies]
