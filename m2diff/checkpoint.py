"""Checkpoints: one ``.pt`` file holding weights, the model config and free-form extras.

```
{"format": "m2diff-checkpoint/1",
 "model": state_dict,         # EMA weights when an EMA is given; bare names, no wrapper prefixes
 "model_cfg": {...},          # plain container of cfg.model: enough to rebuild the model;
                              # a diffusion model's formulation (prediction, target,
                              # residual_scale, sample_start) is stored resolved, explicitly
 "cfg": {...},                # the rest of the run's config (data.norm_percentile, sample, ...),
                              # without data.path / data.cache_dir (no site paths leave a site)
 "extra": {...}}              # e.g. step, optimizer state, raw weights for resuming, round
```
Saving is atomic (temp file in the same folder, flush + fsync, ``os.replace``, fsync of the
folder), so a kill at any moment leaves the previous checkpoint intact. Loading is
``weights_only`` (torch >= 2.6: below it, that can be bypassed) and every failure is a
``CheckpointError`` that names the file. A checkpoint is untrusted input: before a model is
built from the config it carries, the config's numbers are bounded and the model it asks for
is sized on torch's meta device (nothing allocated) and must hold exactly as many weights as
the file does (a 1.4 KB file once asked for a 36 GiB model).

Checkpoints from before formulations existed have no ``formulation`` / ``prediction`` keys:
they load as what they were trained with, noise prediction of their ``target``
(m2diff.model.diffusion.formulation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from m2diff.config import ConfigError
from m2diff.model import build_model, unwrap_model

FORMAT = "m2diff-checkpoint/1"
_PREFIXES = ("_module.", "module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign or for another architecture."""


def clean_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies with wrapper prefixes ('_module.', 'module.', '_orig_mod.') removed."""
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value.detach().cpu().clone()
    return out


def _model_cfg(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """cfg.model as a plain dict (accepts the whole config or the model section)."""
    section = cfg.get("model", cfg) if "arch" not in cfg else cfg
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section)


def _is_diffusion(model_cfg: Mapping[str, Any]) -> bool:
    return model_cfg.get("arch") in ("m2diff", "ddpm_concat")


def _stored_model_cfg(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """cfg.model as saved: a diffusion model's formulation written out explicitly."""
    from m2diff.model.diffusion import resolved_formulation

    model_cfg = _model_cfg(cfg)
    if _is_diffusion(model_cfg):
        model_cfg.update(resolved_formulation(model_cfg))
    return model_cfg


def _run_cfg(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The whole config as a plain dict, site paths removed; {} for a bare model section."""
    if "arch" in cfg:
        return {}
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data = full.get("data")
    if isinstance(data, dict):
        full["data"] = {k: v for k, v in data.items() if k not in ("path", "cache_dir")}
    return full


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: DictConfig | Mapping[str, Any],
                    *, ema: nn.Module | Mapping[str, Tensor] | None = None, **extra: Any) -> Path:
    """Write ``path`` atomically. ``model`` (or ``ema``, averaged weights as a module or a state
    dict such as ``train.EMA.shadow``, when given) supplies the weights; ``cfg`` is the whole config (or its model section); ``extra`` must hold only
    tensors and plain Python containers (it is loaded with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ema is None:
        weights = unwrap_model(model).state_dict()
    else:
        weights = unwrap_model(ema).state_dict() if isinstance(ema, nn.Module) else ema
    payload = {"format": FORMAT, "model": clean_state_dict(weights), "model_cfg": _stored_model_cfg(cfg),
               "cfg": _run_cfg(cfg), "extra": extra}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def check_compatible(state: Mapping[str, Tensor], model: nn.Module, where: str) -> None:
    """Raise CheckpointError unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in unwrap_model(model).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing weights (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: {got[k]} vs {expected[k]})")
        raise CheckpointError(f"{where}: weights do not fit the model architecture: "
                              + "; ".join(detail))


def load_checkpoint(path: str | os.PathLike,
                    model_cfg: DictConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read and check a checkpoint: a dict with "format", "model", "model_cfg", "extra" (whose
    keys are also copied to the top level where free). With ``model_cfg`` (the whole config or its model section),
    also check that its weights fit the model that config builds (e.g. before resuming)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign format, ...
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                              ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an m2diff checkpoint (expected format {FORMAT})")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_cfg"), dict):
        raise CheckpointError(f"{path}: m2diff checkpoint without weights or model config")
    ckpt.setdefault("extra", {})
    for key, value in ckpt["extra"].items():  # convenience: ckpt["round"] as well as ckpt["extra"]["round"]
        ckpt.setdefault(key, value)
    if model_cfg is not None:
        wanted = _model_cfg(model_cfg)
        stored = ckpt["model_cfg"].get("arch")
        if stored != wanted.get("arch"):
            raise CheckpointError(f"{path}: holds a model.arch={stored} model, "
                                  f"this run uses model.arch={wanted.get('arch')}")
        check_compatible(ckpt["model"], _build(wanted, path), str(path))
        if _is_diffusion(wanted):
            _check_formulation(ckpt["model_cfg"], wanted, path)
    return ckpt


MAX_CFG_INT = 2**16        # any integer in a model config (channels, blocks, heads, timesteps)
MAX_CFG_LIST = 64          # entries of any list in it (levels, loss weights)
MAX_MODEL_BYTES = 16 * 2**30  # the paper's model is 0.76 GiB


def _cfg_problem(value: Any, key: str = "model") -> str | None:
    """The first number or list of a model config outside the bounds above, if any."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            problem = _cfg_problem(v, f"{key}.{k}")
            if problem:
                return problem
    elif isinstance(value, list | tuple):
        if len(value) > MAX_CFG_LIST:
            return f"{key} has {len(value)} entries (at most {MAX_CFG_LIST})"
        for i, v in enumerate(value):
            problem = _cfg_problem(v, f"{key}[{i}]")
            if problem:
                return problem
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CFG_INT:
        return f"{key}={value} is larger than {MAX_CFG_INT}"
    return None


def model_state_bytes(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(number of weights, bytes) of the state dict ``build_model(model_cfg)`` makes, built on
    torch's meta device: no memory is allocated, whatever the config asks for."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    state = model.state_dict().values()
    return (int(sum(t.numel() for t in state)),
            int(sum(t.numel() * t.element_size() for t in state)))


def _check_formulation(stored: Mapping[str, Any], wanted: Mapping[str, Any], path: Path) -> None:
    """A run may not continue training a diffusion model with another formulation."""
    from m2diff.model.diffusion import formulation

    try:
        have, want = formulation(stored), formulation(wanted)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    for key in ("prediction", "target", "residual_scale"):
        if getattr(have, key) != getattr(want, key):
            raise CheckpointError(
                f"{path}: trained with model.{key}={getattr(have, key)}, this run uses "
                f"model.{key}={getattr(want, key)} (formulation {want.name}); use another out= "
                f"or set model.{key}={getattr(have, key)}")


def _build(model_cfg: Mapping[str, Any], path: Path,
           weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Build the model of ``model_cfg``; with ``weights`` (what the file holds) only when the
    model it asks for is bounded and holds as many weights."""
    try:
        if weights is not None:
            problem = _cfg_problem(dict(model_cfg))
            if problem:
                raise CheckpointError(f"{path}: stored model config refused: {problem}")
            count, size = model_state_bytes(model_cfg)
            stored = sum(int(t.numel()) for t in weights.values() if isinstance(t, Tensor))
            if size > MAX_MODEL_BYTES:
                raise CheckpointError(f"{path}: stored model config asks for a {size / 2**30:.1f} "
                                      f"GiB model (at most {MAX_MODEL_BYTES / 2**30:.0f} GiB)")
            if count != stored:
                raise CheckpointError(f"{path}: stored model config asks for {count} weights, the "
                                      f"file holds {stored}: weights do not fit the model config")
        return build_model(model_cfg)
    except CheckpointError:
        raise
    except (ConfigError, TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: stored model config cannot build a model: {exc}") from None


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"
               ) -> tuple[nn.Module, DictConfig]:
    """Rebuild the model from the checkpoint's own model config; return it in eval mode on
    ``device`` with the stored run config (a DictConfig whose ``.model`` built it; ``.data``
    holds e.g. ``norm_percentile`` when the saver passed the whole config)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    model = _build(ckpt["model_cfg"], path, weights=ckpt["model"])
    check_compatible(ckpt["model"], model, str(path))
    model.load_state_dict(ckpt["model"])
    stored = ckpt.get("cfg") if isinstance(ckpt.get("cfg"), dict) else {}
    return model.to(device).eval(), OmegaConf.create({**stored, "model": ckpt["model_cfg"]})
