"""Weights packed for the wire (m2diff/transport.py) and back, on the real tiny M2Diff."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m2diff.model import build_model
from m2diff.transport import TransportError, check_transport, decode, encode
from m2diff.wire import FLAT_KEY


@pytest.fixture(scope="module")
def state(tiny_cfg) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    arrays = {k: v.numpy().copy() for k, v in build_model(tiny_cfg.model).state_dict().items()}
    arrays["counter"] = np.array([3, 4], np.int64)  # a non-float buffer travels as itself
    return arrays


def test_float32_round_trip_is_exact_and_one_vector(state):
    arrays, record = encode(state, "float32")
    assert set(arrays) == {FLAT_KEY, "counter"}  # 321 arrays -> one vector + the int buffer
    back, transport = decode(arrays, record)
    assert transport == "float32"
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("transport", ["float16", "bfloat16"])
def test_half_precision_halves_the_bytes_and_comes_back_float32(state, transport):
    full = sum(v.nbytes for v in encode(state, "float32")[0].values())
    arrays, record = encode(state, transport)
    half = sum(v.nbytes for v in arrays.values())
    assert half <= 0.5 * full + 16  # (the int buffer does not shrink)
    back, got = decode(arrays, record)
    assert got == transport
    rel = 2.0**-11 if transport == "float16" else 2.0**-8  # one rounding step
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        if v.dtype.kind == "f":
            tol = rel * np.abs(v) + (6e-8 if transport == "float16" else 0)
            assert np.all(np.abs(back[k] - v) <= tol + 1e-12), k


def test_a_manifest_that_does_not_add_up_is_refused(state):
    arrays, record = encode({k: v for k, v in state.items() if k != "counter"}, "float32")
    manifest = json.loads(record["manifest"])
    with pytest.raises(TransportError, match="values"):
        decode({FLAT_KEY: arrays[FLAT_KEY][:-1]}, record)  # a short vector
    for broken in ({**manifest, "shapes": [[-1]] + manifest["shapes"][1:]},
                   {**manifest, "transport": "float8"}, {**manifest, "names": []}):
        with pytest.raises(TransportError, match="manifest"):
            decode(arrays, {"manifest": json.dumps(broken)})
    with pytest.raises(TransportError, match="dtype"):  # says float32, carries float16
        decode({FLAT_KEY: arrays[FLAT_KEY].astype(np.float16)}, record)
    with pytest.raises(TransportError):
        decode(arrays, {})
    with pytest.raises(ValueError, match="fl.transport=fp8"):
        check_transport("fp8")
