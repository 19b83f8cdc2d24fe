"""The ServerApp waits up to ``READ_TIMEOUT_S`` for its SuperLink's answers (Flower 1.42: 30 s).

Flower 1.42's SuperLink deletes the replies it hands to the ServerApp inside the
``PullMessages`` call that returns them. When that answer takes longer than the ServerApp's
HTTP read timeout, the ServerApp retries and gets Flower's "Message Unavailable" for every
reply of the call: a whole round's replies are gone although every site trained. Seen in a
container rehearsal on a loaded coordinator ("The read operation timed out ... Connection
successful after 30.87 seconds and 2 tries", then "Message Unavailable" for all three sites;
deploy/README). The SuperLink listens on the coordinator's loopback: a slow answer there is
a busy machine, not a lost network, so the ServerApp waits for it. A SuperLink that is gone
still fails at once (connection refused), and m2diff-server restarts it.
"""

from __future__ import annotations

from typing import Any

import httpx

READ_TIMEOUT_S = 600.0


def wait_for_slow_answers(grid: Any, read_s: float = READ_TIMEOUT_S) -> bool:
    """Raise the read (and write) timeout of ``grid``'s HTTP client to the SuperLink to
    ``read_s`` seconds; connect and pool timeouts stay Flower's. True when applied; False for
    a grid without one (the simulation engine's in-memory grid)."""
    if not hasattr(type(grid), "_runtime_client"):
        return False
    http = getattr(grid._runtime_client, "_client", None)  # the property makes the client
    if not isinstance(http, httpx.Client):
        raise RuntimeError("server/runtime_patience.py: this Flower's grid keeps no httpx.Client at "
                           "_runtime_client._client; check it against the installed flwr")
    old = http.timeout
    http.timeout = httpx.Timeout(connect=old.connect, read=read_s, write=read_s, pool=old.pool)
    return True
