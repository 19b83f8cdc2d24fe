"""``device=auto|cpu|cuda|cuda:N`` -> torch.device, with a one-line error when it cannot work."""

from __future__ import annotations

import re

import torch

from m2diff.config import ConfigError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto: the first CUDA device when present, else CPU. cuda / cuda:N must exist."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    value = str(spec or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not match:
        raise ConfigError(f"device={spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec}: CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use device=cpu or device=auto")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={spec}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
