"""Packed weights in and out of the ClientApp (the format: m2diff/transport.py).

A message that arrives packed (a ``transport`` ConfigRecord beside its arrays) is unpacked
before anything else reads it, and the reply's weights leave packed in the same precision.
Messages that are not packed (SecAgg+ stages, older coordinators) pass untouched. A packed
message that does not unpack is refused like any other bad input (a fixed-code error).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from m2diff.transport import decode, encode
from m2diff.wire import ARRAYS_KEY, TRANSPORT_RECORD


def transport_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the request's weights, call the app, pack the reply's the same way."""
    content = msg.content
    record = content.config_records.get(TRANSPORT_RECORD)
    if record is None or ARRAYS_KEY not in content.array_records:
        return call_next(msg, context)
    state, transport = decode({k: a.numpy() for k, a in content.array_records[ARRAYS_KEY].items()},
                              record)
    content[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in state.items()})
    del content[TRANSPORT_RECORD]
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    out = reply.content
    arrays, manifest = encode({k: a.numpy() for k, a in out.array_records[ARRAYS_KEY].items()},
                              transport)
    out[ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    out[TRANSPORT_RECORD] = ConfigRecord(manifest)
    return reply
