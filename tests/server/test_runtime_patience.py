"""The ServerApp's HTTP client to its SuperLink waits for slow answers (server/runtime_patience.py)."""

from __future__ import annotations

import httpx
import pytest
from flwr.superlink.grid import HttpGrid

from server.runtime_patience import READ_TIMEOUT_S, wait_for_slow_answers


def test_flowers_own_grid_waits_for_slow_answers():
    """On the grid Flower 1.42 gives a deployed ServerApp (an HttpGrid): reads and writes wait
    READ_TIMEOUT_S instead of Flower's 30 s; connecting to a SuperLink that is gone still fails
    as fast as before. Fails when a Flower upgrade moves the client: the helper raises then."""
    grid = HttpGrid("127.0.0.1:9", insecure=True, token="t")
    before = grid._runtime_client._client.timeout
    assert before.read == 30.0  # Flower's: the replies of a pull slower than this are lost
    assert wait_for_slow_answers(grid)
    after = grid._runtime_client._client.timeout
    assert (after.read, after.write) == (READ_TIMEOUT_S, READ_TIMEOUT_S)
    assert (after.connect, after.pool) == (before.connect, before.pool)
    with pytest.raises(httpx.ConnectError):  # nothing listens on port 9: no wait
        grid._runtime_client._client.post("http://127.0.0.1:9/v1/x", content=b"")


def test_a_grid_without_flowers_http_client_is_left_alone():
    """The simulation engine's in-memory grid talks to no SuperLink over HTTP: nothing to do."""

    class InProcessGrid:
        pass

    assert wait_for_slow_answers(InProcessGrid()) is False
