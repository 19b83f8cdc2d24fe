"""Which site folder a ClientApp serves, and its config, data and model for one message.

Deployment: the SuperNode's node config holds ``data-path`` (absolute site folder),
``site-name`` and optionally ``cache-dir`` (the site's own cache folder, which wins over the
coordinator's ``data.cache_dir``). Simulation: node config holds only ``partition-id``; the run config's
``sim-sites`` (comma-separated absolute folders) maps it to a folder, named after it.
Every round starts a fresh ClientApp process in deployment, so nothing is kept in memory
between rounds; decoded slices are cached on the site's disk by m2diff.data.dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message
from omegaconf import DictConfig

from m2diff.data.layout import Site
from m2diff.data.verdict import validate_site_cached
from m2diff.fedutil import compose_run_config
from m2diff.model import build_model
from m2diff.train import resolve_device


class SiteError(RuntimeError):
    """The site cannot take part (no folder configured, no usable subjects)."""


def site_folder(context: Context) -> tuple[Path, str | None]:
    """The site folder and its configured name (None: use the folder name)."""
    node = context.node_config
    if str(node.get("data-path", "") or ""):
        name = str(node.get("site-name", "") or "") or None
        return Path(str(node["data-path"])).expanduser(), name
    sites = [s.strip() for s in str(context.run_config.get("sim-sites", "") or "").split(",")
             if s.strip()]
    if "partition-id" in node and sites:
        pid = int(node["partition-id"])
        if pid >= len(sites):
            raise SiteError(f"partition-id {pid} but run config sim-sites lists {len(sites)} folders")
        return Path(sites[pid]), None
    raise SiteError("no site folder: start the SuperNode with --node-config 'data-path=\"/abs/site\"'")


def apply_site_settings(cfg: DictConfig, context: Context) -> DictConfig:
    """What the site decides itself wins over the coordinator's run config: ``cache-dir``
    in the node config (``m2diff-client cache-dir=DIR``) replaces ``data.cache_dir``."""
    cache_dir = str(context.node_config.get("cache-dir", "") or "")
    if cache_dir:
        cfg.data.cache_dir = cache_dir
    return cfg


@dataclass
class SiteRun:
    """Everything one ClientApp call needs: config, usable subjects, device, site name."""

    cfg: DictConfig
    site: Site
    name: str
    device: torch.device

    @classmethod
    def open(cls, context: Context) -> SiteRun:
        """Compose the run's config and validate the site (raises SiteError when unusable)."""
        cfg = compose_run_config(context.run_config)
        apply_site_settings(cfg, context)
        folder, name = site_folder(context)
        # The verdict is cached on the site's disk: a round does not re-read every volume.
        site, _ = validate_site_cached(folder, cfg.data.get("cache_dir"), require_sd=True,
                                       require_t1=bool(cfg.data.get("require_t1", True)))
        if not site.subjects:
            # Problems name subjects and files: they stay in the site's own log.
            raise SiteError(f"site {name or site.name}: no usable subjects (run m2diff check)")
        return cls(cfg, site, name or site.name, resolve_device(cfg.device))

    def model_from(self, msg: Message) -> torch.nn.Module:
        """The model of the config with the global weights the message carries."""
        model = build_model(self.cfg.model)
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)
