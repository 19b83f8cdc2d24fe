"""Models: M2Diff and the two baselines, all built from ``cfg.model`` by ``build_model``.

Every model has ``.is_diffusion`` and ``.stride`` (slice H and W must be multiples of it).
Diffusion models: ``forward(x_t, t, ld, t1=None) -> out`` (B, 1, H, W), the noise, x_0 or v
as the formulation says (m2diff.model.diffusion); M2Diff also ``forward_heads``. Regression (unet): ``forward(ld, t1=None) -> sd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from m2diff.config import ConfigError
from m2diff.model.baselines import ConcatDDPM, RegressionUNet
from m2diff.model.m2diff import M2Diff

ARCHS = ("m2diff", "unet", "ddpm_concat")

__all__ = ["ARCHS", "ConcatDDPM", "M2Diff", "RegressionUNet", "build_model", "count_parameters",
           "unwrap_model"]


def _check(cfg: Mapping[str, Any]) -> None:
    channels = list(cfg["channels"])
    groups = int(cfg["norm_num_groups"])
    if cfg["arch"] not in ARCHS:
        raise ConfigError(f"model.arch={cfg['arch']!r}: expected one of {', '.join(ARCHS)}")
    if len(channels) < 2:
        raise ConfigError(f"model.channels={channels}: needs at least 2 levels")
    if any(c % groups for c in channels):
        raise ConfigError(f"model.channels={channels}: each must be a multiple of "
                          f"model.norm_num_groups={groups}")
    if cfg["arch"] == "unet":
        return
    attention = list(cfg["attention_levels"])
    if len(attention) != len(channels):
        raise ConfigError(f"model.attention_levels has {len(attention)} entries, "
                          f"model.channels has {len(channels)}")
    heads = int(cfg["num_heads"])
    bad = [c for c, a in zip(channels, attention, strict=True) if a and (heads < 1 or c % heads)]
    if bad:
        raise ConfigError(f"model.num_heads={heads} must divide the channels of attention levels {bad}")


def build_model(model_cfg: DictConfig | Mapping[str, Any]) -> nn.Module:
    """Build the model ``model_cfg.arch`` names (m2diff | unet | ddpm_concat), in train mode."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) \
        else dict(model_cfg)
    try:
        _check(cfg)
        arch = cfg["arch"]
        if arch == "unet":
            return RegressionUNet(cfg["channels"], int(cfg["num_res_blocks"]),
                                  int(cfg["norm_num_groups"]), float(cfg["dropout"]),
                                  float(cfg.get("mri_dropout", 0.0)))
        if arch == "ddpm_concat":
            return ConcatDDPM(cfg["channels"], cfg["attention_levels"], int(cfg["num_res_blocks"]),
                              int(cfg["num_heads"]), int(cfg["norm_num_groups"]),
                              float(cfg.get("mri_dropout", 0.0)), bool(cfg.get("noise_cond") or False))
        return M2Diff(cfg["channels"], cfg["attention_levels"], int(cfg["num_res_blocks"]),
                      int(cfg["num_heads"]), int(cfg["norm_num_groups"]), float(cfg["dropout"]),
                      float(cfg["mri_dropout"]), bool(cfg.get("noise_cond") or False))
    except KeyError as exc:
        raise ConfigError(f"model config lacks key {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside wrappers (Opacus' GradSampleModule ``_module``, DDP/DataParallel
    ``module``, torch.compile ``_orig_mod``)."""
    while True:
        inner = next((m for name in ("_module", "module", "_orig_mod")
                      if isinstance(m := getattr(model, name, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner
