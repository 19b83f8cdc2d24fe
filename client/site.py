"""Which site folder a ClientApp serves, and its config, data and model for one message.

Deployment: the SuperNode's node config holds ``data-path`` (absolute site folder),
``site-name`` and the site's own settings and limits (client/site_policy.py: cache and state
folders, device, split, caps, privacy policy); the coordinator's run config is checked
against them before it is composed. Simulation: node config holds only ``partition-id``;
the run config's ``sim-sites`` (comma-separated absolute folders) maps it to a folder, named
after it, and that virtual site takes its settings from the run (there is no hospital).
Every round starts a fresh ClientApp process in deployment, so nothing is kept in memory
between rounds; decoded slices are cached on the site's disk by m2diff.data.dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message
from omegaconf import DictConfig

from client.site_errors import SiteError, SitePolicyError
from client.site_policy import (
    SitePolicy,
    check_model_size,
    check_privacy,
    check_split_size,
    site_config,
)
from m2diff.data.layout import Site, Subject
from m2diff.data.splits import split_subjects
from m2diff.data.verdict import validate_site_cached
from m2diff.device import resolve_device
from m2diff.model import build_model
from m2diff.wire import (
    DATA_PATH_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SIM_SITES_KEY,
    SITE_NAME_KEY,
)

__all__ = ["SiteError", "SitePolicyError", "SiteRun", "site_folder"]


def site_folder(context: Context) -> tuple[Path, str | None, bool]:
    """The site folder, its configured name (None: use the folder name) and whether it is a
    virtual site of a simulation (its folder named by the run config)."""
    node = context.node_config
    if str(node.get(DATA_PATH_KEY, "") or ""):
        name = str(node.get(SITE_NAME_KEY, "") or "") or None
        return Path(str(node[DATA_PATH_KEY])).expanduser(), name, False
    sites = [s.strip() for s in str(context.run_config.get(SIM_SITES_KEY, "") or "").split(",")
             if s.strip()]
    if PARTITION_ID_KEY in node and NUM_PARTITIONS_KEY in node and sites:
        pid = int(node[PARTITION_ID_KEY])
        if pid >= len(sites):
            raise SiteError(f"partition-id {pid} but run config sim-sites lists {len(sites)} folders")
        return Path(sites[pid]), None, True
    raise SiteError("no site folder: start the SuperNode with --node-config 'data-path=\"/abs/site\"'")


@dataclass
class SiteRun:
    """Everything one ClientApp call needs: config, usable subjects, device, site name, and
    the site's policy (``virtual``: a simulated site, no hospital behind it)."""

    cfg: DictConfig
    site: Site
    name: str
    device: torch.device
    policy: SitePolicy
    virtual: bool = False

    @classmethod
    def open(cls, context: Context) -> SiteRun:
        """Check and compose the run's config under the site's policy and validate the site
        (raises SitePolicyError / SiteError)."""
        folder, name, virtual = site_folder(context)
        policy = SitePolicy.virtual() if virtual else SitePolicy.from_node_config(context.node_config)
        cfg = site_config(context.run_config, policy, virtual, name or folder.name)
        check_privacy(cfg, policy, name or folder.name)
        with torch.device("meta"):  # counted without allocating: the run picks the model
            check_model_size(sum(p.numel() for p in build_model(cfg.model).parameters()), policy)
        # The verdict is cached on the site's disk, signed with the site's key: a round does
        # not re-read every volume.
        site, _ = validate_site_cached(folder, cfg.data.get("cache_dir"), require_sd=True,
                                       require_t1=bool(cfg.data.get("require_t1", True)),
                                       state_dir=policy.state_dir,
                                       max_volume_mb=cfg.data.get("max_volume_mb"))
        if not site.subjects:
            # Problems name subjects and files: they stay in the site's own log.
            raise SiteError(f"site {name or site.name}: no usable subjects (run m2diff check)")
        return cls(cfg, site, name or site.name, resolve_device(cfg.device), policy, virtual)

    @property
    def split_seed(self) -> int:
        """The seed of the subject split: the site's own (node config split-seed, else the
        conf default), so that the coordinator's ``seed`` cannot choose the test subjects;
        a virtual site uses the run's."""
        if self.virtual:
            return int(self.cfg.seed)
        return int(self.policy.split_seed) if self.policy.split_seed is not None else 0

    def subjects(self, split: str) -> list[Subject]:
        """The site's subjects of ``split``, refused when fewer than min-split-subjects."""
        chosen = split_subjects(self.site.subjects, self.cfg.data.split, self.split_seed)[split]
        check_split_size(split, len(chosen), self.policy)
        return chosen

    def model_from(self, msg: Message) -> torch.nn.Module:
        """The model of the config with the global weights the message carries."""
        model = build_model(self.cfg.model)
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)
