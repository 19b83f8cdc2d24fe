"""How model weights travel between the coordinator and a site: one flat vector.

Flower 1.42 stores and moves every array of a message as its own object (one pull or push
request per array through the SuperLink's object store). The tiny M2Diff has 320 arrays, so a
plain ``ArrayRecord(state_dict)`` costs a site hundreds of HTTPS requests per message, and a
round took minutes around seconds of training. Packed, the floating-point weights travel as
one vector (one object, split in Flower's 5 MiB chunks) in ``fl.transport``'s precision:

* ``float32``: bit-exact;
* ``float16`` / ``bfloat16``: half the bytes; the receiver widens to float32 at once, so
  aggregation, checkpoints and training stay float32 (bfloat16 travels as its raw 16-bit
  pattern, numpy has no bfloat16);
* ``arrays``: not packed, Flower's own one object per array (what benchmarks/federation.py
  compares against).

Arrays that are not floating point (integer buffers) travel as themselves. The manifest
(names, shapes, dtypes in order) travels with the vector, so the receiver needs no model to
unpack, and it is checked against the vector: a manifest that does not add up is an error.

This module is Flower-free (numpy and torch only): ``encode`` gives the two plain dicts a
message carries (arrays for its ArrayRecord, strings for its ConfigRecord ``TRANSPORT_RECORD``)
and ``decode`` reads them back; client/transport.py and server/transport.py are the Flower
adapters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from m2diff.wire import FLAT_KEY

FORMAT = "m2diff-flat-1"
PACKED = ("float32", "float16", "bfloat16")
# "arrays": Flower's own ArrayRecord, one object per array (no packing; for comparison)
TRANSPORTS = (*PACKED, "arrays")


class TransportError(ValueError):
    """A packed message that cannot be unpacked (inconsistent manifest or vector)."""


def check_transport(name: str) -> str:
    """``fl.transport`` lower-cased, or ValueError naming the setting and the choices."""
    value = str(name).lower()
    if value not in TRANSPORTS:
        raise ValueError(f"fl.transport={name}: choose one of {', '.join(TRANSPORTS)}")
    return value


@dataclass
class Packed:
    """Weights as they travel: ``flat`` (1-D, ``transport`` precision; uint16 bit patterns for
    bfloat16), the non-float arrays by name, and the manifest that puts them back."""

    flat: np.ndarray
    others: dict[str, np.ndarray]
    manifest: dict

    def manifest_json(self) -> str:
        return json.dumps(self.manifest, separators=(",", ":"))

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes + sum(a.nbytes for a in self.others.values()))


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def pack(arrays: Mapping[str, np.ndarray], transport: str = "float32") -> Packed:
    """Concatenate the floating-point arrays of ``arrays`` (in order) into one vector of
    ``transport`` precision (one of ``PACKED``); the rest are kept as they are."""
    transport = check_transport(transport)
    if transport not in PACKED:
        raise ValueError(f"fl.transport={transport} is not a packed transport")
    names, shapes, dtypes, floats, others = [], [], [], [], {}
    for name, value in arrays.items():
        a = np.asarray(value)
        names.append(name)
        shapes.append(list(a.shape))
        dtypes.append(str(a.dtype))
        if _is_float(a):
            floats.append(a.astype(np.float32, copy=False).ravel())
        else:
            others[name] = a
    flat32 = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    if transport == "float32":
        flat = flat32
    elif transport == "float16":
        flat = flat32.astype(np.float16)
    else:  # bfloat16 as its bit pattern (round to nearest even, torch's conversion)
        flat = torch.from_numpy(np.ascontiguousarray(flat32)).to(torch.bfloat16).view(torch.int16)\
            .numpy().view(np.uint16)
    manifest = {"format": FORMAT, "transport": transport, "names": names, "shapes": shapes,
                "dtypes": dtypes}
    return Packed(flat=flat, others=others, manifest=manifest)


def _widen(flat: np.ndarray, transport: str) -> np.ndarray:
    if transport == "bfloat16":
        if flat.dtype != np.uint16:
            raise TransportError(f"bfloat16 vector must travel as uint16, got {flat.dtype}")
        return torch.from_numpy(flat.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    expected = np.float32 if transport == "float32" else np.float16
    if flat.dtype != expected:
        raise TransportError(f"{transport} vector has dtype {flat.dtype}")
    return flat.astype(np.float32, copy=False)


def unpack(flat: np.ndarray, others: Mapping[str, np.ndarray], manifest_json: str
           ) -> dict[str, np.ndarray]:
    """The arrays ``pack`` was given (floats widened back to their dtype; float16/bfloat16
    transport is lossy); ``TransportError`` when the parts do not fit together."""
    try:
        manifest = json.loads(manifest_json)
        transport = check_transport(manifest["transport"])
        if transport not in PACKED:
            raise ValueError("not packed")
        names, shapes, dtypes = manifest["names"], manifest["shapes"], manifest["dtypes"]
        if manifest.get("format") != FORMAT or not len(names) == len(shapes) == len(dtypes):
            raise ValueError("bad format or lengths")
        if any(int(d) < 0 for s in shapes for d in s):
            raise ValueError("negative dimension")
        sizes = [math.prod(int(d) for d in s) for s in shapes]
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"unreadable transport manifest ({type(exc).__name__})") from None
    flat = np.asarray(flat).ravel()
    wide = _widen(flat, transport)
    float_total = sum(n for n, d in zip(sizes, dtypes, strict=True) if np.issubdtype(np.dtype(d), np.floating))
    if wide.size != float_total:
        raise TransportError(f"vector has {wide.size} values, the manifest {float_total}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype, size in zip(names, shapes, dtypes, sizes, strict=True):
        if np.issubdtype(np.dtype(dtype), np.floating):
            out[name] = wide[offset:offset + size].reshape(shape).astype(dtype, copy=False)
            offset += size
        else:
            if name not in others or list(np.shape(others[name])) != list(shape):
                raise TransportError(f"array {name!r} is missing or has another shape")
            out[name] = np.asarray(others[name])
    return out


def encode(arrays: Mapping[str, np.ndarray], transport: str = "float32"
           ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``arrays`` packed: (the arrays a message's ArrayRecord holds, the strings its
    ``TRANSPORT_RECORD`` ConfigRecord holds)."""
    packed = pack(arrays, transport)
    return {FLAT_KEY: packed.flat, **packed.others}, {"manifest": packed.manifest_json()}


def decode(arrays: Mapping[str, np.ndarray], record: Mapping[str, object]
           ) -> tuple[dict[str, np.ndarray], str]:
    """The inverse of ``encode``: (the arrays, the transport they travelled in);
    ``TransportError`` when they do not fit together."""
    if FLAT_KEY not in arrays or not isinstance(record.get("manifest"), str):
        raise TransportError("packed message without its vector or manifest")
    others = {k: v for k, v in arrays.items() if k != FLAT_KEY}
    manifest = str(record["manifest"])
    return unpack(arrays[FLAT_KEY], others, manifest), str(json.loads(manifest)["transport"])
