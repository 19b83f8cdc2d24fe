"""Assign subjects to train / val / test: by subject, seeded, stable under added subjects."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from m2diff.config import ConfigError
from m2diff.data.layout import SPLITS, Subject


def split_subjects(subjects: Sequence[Subject], fractions: Sequence[float],
                   seed: int) -> dict[str, list[Subject]]:
    """Split subjects into {"train", "val", "test"}; each subject lands in exactly one.

    A split given in participants.tsv (``Subject.split``) wins. The others are placed by
    a hash of (seed, subject id) against the cumulative ``fractions`` (train, val, test), so
    adding a subject never moves another. With very few subjects, at least one goes to
    train and, when the test fraction is > 0 and there are two or more subjects, one to
    test: the subjects with the extreme hash values are moved. Input order is kept.
    """
    f = _fractions(fractions)
    bounds = (f[0], f[0] + f[1])
    out: dict[str, list[Subject]] = {s: [] for s in SPLITS}
    auto: list[tuple[float, Subject]] = []
    split_of: dict[str, str] = {}
    for subject in subjects:
        if subject.split in SPLITS:
            split_of[subject.id] = subject.split
            continue
        u = _unit_hash(seed, subject.id)
        auto.append((u, subject))
        split_of[subject.id] = "train" if u < bounds[0] else "val" if u < bounds[1] else "test"

    counts = {s: sum(v == s for v in split_of.values()) for s in SPLITS}
    movable = sorted(auto, key=lambda pair: pair[0])  # by hash: train end first
    if counts["train"] == 0 and movable:
        sid = movable[0][1].id
        counts[split_of[sid]] -= 1
        split_of[sid] = "train"
        counts["train"] += 1
    if f[2] > 0 and counts["test"] == 0 and len(split_of) >= 2:
        for _, subject in reversed(movable):
            src = split_of[subject.id]
            if src != "train" or counts["train"] > 1:
                split_of[subject.id] = "test"
                break

    for subject in subjects:
        out[split_of[subject.id]].append(subject)
    return out


def _fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise ConfigError(f"data.split must be three numbers (train, val, test), got "
                          f"{fractions!r}") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split must be three non-negative fractions with a positive "
                          f"sum, got {list(values)}")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def _unit_hash(seed: int, subject_id: str) -> float:
    """A number in [0, 1) fixed by (seed, subject id), identical on every machine."""
    digest = hashlib.sha256(f"{int(seed)}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
