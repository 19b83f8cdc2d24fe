"""What a hospital allows the coordinator to make its site do.

The coordinator's run config reaches every ClientApp as an ``overrides`` string of Hydra
words. Composing it as it comes let the coordinator read the site's environment
(``device=${oc.env:SECRET,cpu}``), load any YAML on its disk (``hydra.searchpath=...``), move
the decoded patient slices (``data.cache_dir=``) or make the test set one patient
(``data.split=[1,0,0.0001]``). Here every word is checked before Hydra sees it:

- syntax: ``key=value`` or ``++key=value`` (``m2diff simulate`` sends its settings that way;
  ``++`` is accepted only for keys of the allow-list, so it cannot add new keys); no ``+key``,
  ``~key``, ``key@package``, no ``hydra.*``, no ``$`` anywhere (OmegaConf interpolations and
  resolvers), no ``(`` / ``)`` / backslash (Hydra functions and sweeps);
- keys the coordinator may set (they change the learning, and every site must agree on
  them): the group choices ``model=`` and ``privacy=`` (an option of the site's own conf),
  every leaf of the site's conf under ``model``, ``train``, ``fl``, ``privacy`` and
  ``sample``, ``seed``, and ``data.image_size``, ``data.min_brain_fraction``,
  ``data.norm_percentile``, ``data.require_t1``;
- keys that are the site's (``SITE_OWNED``: device, cache folder, split, data location,
  file-size bound, loader workers, output folder, the generator, raw exports and their
  preparation): a value from the coordinator
  is ignored, with a line in the site's log; the site's node config, else its conf default,
  is used;
- anything else is refused.

Then the site's caps (node config, ``SitePolicy``) are checked against the composed config,
and the site's privacy policy (``check_privacy``): it wins over the run's settings.

A virtual site of ``m2diff simulate`` (no hospital: its folder comes from the run config)
applies the same syntax and key checks but takes the site-owned keys from the run, because the
person who starts the simulation owns both sides.

Refusals raise ``SitePolicyError``: the coordinator gets the fixed code ``site-policy``
(client/site_errors.py), the site's log the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from logging import INFO
from typing import Any

from flwr.supercore import log
from omegaconf import DictConfig, OmegaConf

from client.site_errors import SitePolicyError
from m2diff.config import ConfigError, compose, conf_dir, group_options
from m2diff.fedutil import split_overrides
from m2diff.wire import OVERRIDES_KEY

PRIVACY_KINDS = ("none", "dp", "central_dp")
GROUP_CHOICES = ("model", "privacy")  # ``group=option`` words a coordinator may send
LEARNING_ROOTS = ("model", "train", "fl", "privacy", "sample")
LEARNING_DATA = ("data.image_size", "data.min_brain_fraction", "data.norm_percentile",
                 "data.require_t1")
SITE_OWNED = ("device", "out", "data", "data.path", "data.cache_dir", "data.split",
              "data.require_sd", "data.max_volume_mb", "train.num_workers",
              "train.checkpoint_every", "generate", "export", "prepare")
# Every key below these is the site's too (the generator, raw exports and their preparation).
SITE_OWNED_TREES = ("generate", "export", "prepare")
MAX_OVERRIDES_CHARS = 16_384
_WORD = re.compile(r"(?P<plus>\+\+)?(?P<key>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(?P<value>.*)", re.S)
_FORBIDDEN_CHARS = ("$", "(", ")", "\\")


@dataclass(frozen=True)
class SitePolicy:
    """A site's own settings and limits, from its SuperNode node config (``m2diff-client``
    keys of the same names). Defaults are what a site without the key gets."""

    # The site's own settings (the coordinator's values for these keys are ignored).
    cache_dir: str | None = None  # cache-dir: decoded slices (None: <site>/.m2diff-cache)
    state_dir: str | None = None  # state-dir: privacy ledger, verdict key (None: <site>/.m2diff-state)
    device: str | None = None  # device: cpu | cuda | cuda:N | auto (None: the conf's, auto)
    split: tuple[float, float, float] | None = None  # split: train,val,test fractions
    split_seed: int | None = None  # split-seed: seed of the subject split (None: conf seed)
    max_volume_mb: float | None = None  # max-volume-mb: bound on a decoded volume (float32 MiB)
    # Caps on what a run may ask.
    max_steps: int = 10_000  # max-steps: train.steps per round
    min_batch_size: int = 1  # min-batch-size: train.batch_size
    min_split_subjects: int = 1  # min-split-subjects: subjects of the split a message uses
    max_model_mparams: float = 500.0  # max-model-mparams: model size, millions of parameters
    # Privacy policy.
    require_privacy: str = "none"  # require-privacy: none | dp | central_dp
    max_epsilon: float = 10.0  # max-epsilon: sample-level epsilon over the site's lifetime
    min_noise_multiplier: float = 0.5  # min-noise-multiplier: DP noise std / clipping norm
    max_grad_norm: float | None = None  # max-grad-norm: cap on privacy.max_grad_norm (dp)
    clip_norm: float = 1.0  # clip-norm: the site's update clipping norm (require central_dp)
    delta: float = 1e-5  # delta: the delta of the site's epsilon
    require_secagg: bool = False  # require-secagg: train / evaluate only with SecAgg+

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SitePolicy:
        """Parse the node config (raises SitePolicyError naming a bad key)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            raw = node.get(key)
            if raw is None or str(raw).strip() == "":
                continue
            try:
                values[f.name] = _parse(f.name, raw)
            except (TypeError, ValueError) as exc:
                raise SitePolicyError(f"node config {key}={raw!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def virtual(cls) -> SitePolicy:
        """A virtual site of ``m2diff simulate``: no hospital behind it, so no caps and no
        privacy floors of its own (the run's settings are the researcher's)."""
        return cls(max_steps=2**62, max_model_mparams=math.inf, max_epsilon=math.inf,
                   min_noise_multiplier=0.0)


NODE_KEYS = tuple(f.name.replace("_", "-") for f in fields(SitePolicy))


def _parse(name: str, raw: Any) -> Any:
    text = str(raw).strip()
    if name in ("cache_dir", "state_dir"):
        return text
    if name == "device":
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", text):
            raise ValueError("expected cpu, auto, cuda or cuda:N")
        return text
    if name == "require_privacy":
        if text not in PRIVACY_KINDS:
            raise ValueError(f"expected one of {', '.join(PRIVACY_KINDS)}")
        return text
    if name == "require_secagg":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1", "yes")
    if name == "split":
        parts = [float(p) for p in text.strip("[]").split(",")]
        if len(parts) != 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
            raise ValueError("expected three non-negative fractions train,val,test")
        return tuple(parts)
    if name in ("max_steps", "min_batch_size", "min_split_subjects", "split_seed"):
        value = int(text)
        if value < (0 if name == "split_seed" else 1):
            raise ValueError("expected a positive integer")
        return value
    value = float(text)
    lowest_ok = 0.0 if name == "min_noise_multiplier" else math.nextafter(0.0, 1.0)
    if not (math.isfinite(value) and value >= lowest_ok):
        raise ValueError("expected a positive number")
    return value


# ---------------------------------------------------------------------------- overrides
@lru_cache(maxsize=1)
def coordinator_keys() -> frozenset[str]:
    """Leaf keys of the site's conf a coordinator may set (see module doc)."""
    base = OmegaConf.to_container(compose([]), resolve=False)
    assert isinstance(base, dict)
    keys = {k for k in _leaves(base) if k.split(".")[0] in LEARNING_ROOTS}
    keys |= {"seed", *LEARNING_DATA}
    for group in GROUP_CHOICES:
        for option in group_options(group):
            node = OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{option}.yaml"))
            assert isinstance(node, dict)
            node.pop("defaults", None)
            keys |= {f"{group}.{k}" for k in _leaves(node)}
    return frozenset(keys)


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _leaves(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _site_owned(key: str) -> bool:
    return key in SITE_OWNED or any(key.startswith(k + ".") for k in SITE_OWNED_TREES)


@dataclass(frozen=True)
class CheckedOverrides:
    """The words a site composes and the site-owned words it ignored."""

    compose: list[str]
    ignored: list[str]


def check_overrides(text: str, virtual: bool = False) -> CheckedOverrides:
    """Check the coordinator's ``overrides`` string word by word (module doc); raises
    SitePolicyError naming the first word it refuses."""
    if len(text) > MAX_OVERRIDES_CHARS:
        raise SitePolicyError(f"overrides: {len(text)} characters, more than {MAX_OVERRIDES_CHARS}")
    allowed = coordinator_keys()
    keep: list[str] = []
    ignored: list[str] = []
    for word in split_overrides(text):
        if any(c in word for c in _FORBIDDEN_CHARS):
            raise SitePolicyError(f"override {word!r}: interpolations ($), functions and escapes "
                                  "are not accepted")
        match = _WORD.fullmatch(word)
        if match is None:
            raise SitePolicyError(f"override {word!r}: only key=value (or ++key=value for a "
                                  "known key) is accepted; no +key, ~key or key@package")
        key, plus = match["key"], bool(match["plus"])
        if key.split(".")[0] == "hydra":
            raise SitePolicyError(f"override {word!r}: hydra.* is not accepted")
        if _site_owned(key):
            if virtual:
                keep.append(word)
            else:
                ignored.append(word)
            continue
        if key in GROUP_CHOICES:
            if plus or match["value"] not in group_options(key):
                raise SitePolicyError(f"override {word!r}: {key} must be one of this site's "
                                      f"options {group_options(key)}")
            keep.append(word)
        elif key in allowed:
            keep.append(word)
        else:
            raise SitePolicyError(f"override {word!r}: {key} is not a setting a coordinator "
                                  "may change on this site")
    return CheckedOverrides(keep, ignored)


def site_config(run_config: Mapping[str, Any], policy: SitePolicy, virtual: bool = False,
                site: str = "") -> DictConfig:
    """The config this site runs with: the coordinator's checked overrides composed with the
    site's conf, the site-owned settings of ``policy`` applied and its caps checked."""
    checked = check_overrides(str(run_config.get(OVERRIDES_KEY, "") or ""), virtual)
    if checked.ignored:
        log(INFO, "site %s: ignoring the coordinator's site-owned setting(s) %s (the site's "
            "own values are used)", site, " ".join(checked.ignored))
    try:
        cfg = compose(checked.compose)
    except ConfigError as exc:
        raise SitePolicyError(f"the run's settings do not compose on this site: {exc}") from None
    if policy.cache_dir:
        cfg.data.cache_dir = policy.cache_dir
    if policy.device:
        cfg.device = policy.device
    if policy.split is not None:
        cfg.data.split = list(policy.split)
    if policy.max_volume_mb is not None:
        cfg.data.max_volume_mb = policy.max_volume_mb
    check_caps(cfg, policy)
    return cfg


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SitePolicyError(f"{key}={value!r}: not a finite number")
    return float(value)


def check_caps(cfg: DictConfig, policy: SitePolicy) -> None:
    """train.steps <= max-steps, train.batch_size >= min-batch-size (SitePolicyError)."""
    steps, batch = _number(cfg, "train.steps"), _number(cfg, "train.batch_size")
    if steps != int(steps) or not 0 <= steps <= policy.max_steps:
        raise SitePolicyError(f"train.steps={cfg.train.steps}: this site allows 0..{policy.max_steps} "
                              "steps per round (node config max-steps)")
    if batch != int(batch) or batch < policy.min_batch_size:
        raise SitePolicyError(f"train.batch_size={cfg.train.batch_size}: this site needs at least "
                              f"{policy.min_batch_size} (node config min-batch-size)")


def check_model_size(parameters: int, policy: SitePolicy) -> None:
    """A model of more than max-model-mparams million parameters is not built (memory)."""
    if parameters > policy.max_model_mparams * 1e6:
        raise SitePolicyError(f"the run's model has {parameters / 1e6:.1f} M parameters; this "
                              f"site builds at most {policy.max_model_mparams:g} M "
                              "(node config max-model-mparams)")


def check_split_size(split: str, count: int, policy: SitePolicy) -> None:
    """A message uses a split of the site's subjects only when it holds min-split-subjects."""
    if count < policy.min_split_subjects:
        raise SitePolicyError(f"the {split} split has {count} subject(s); this site answers with "
                              f"at least {policy.min_split_subjects} (node config min-split-subjects)")


# ---------------------------------------------------------------------------- privacy
def run_privacy(cfg: DictConfig) -> str:
    """The run's privacy kind (none | dp | central_dp)."""
    return str(cfg.privacy.get("kind", "none"))


def check_privacy(cfg: DictConfig, policy: SitePolicy, site: str) -> None:
    """The site's privacy policy against the run's settings (train and evaluate alike):
    the required kind, SecAgg+, and for DP runs delta, the per-slice clipping norm and an
    explicit noise multiplier; for a required ``central_dp``, clipping by the site itself
    at no more than the site's norm. Raises SitePolicyError. The derived noise of
    ``privacy.target_epsilon`` is checked where it is known (client/privacy.py)."""
    kind = run_privacy(cfg)
    required = policy.require_privacy
    if required not in ("none", kind):
        raise SitePolicyError(f"site {site} requires privacy={required} (node config "
                              f"require-privacy); this run uses privacy={kind}: not training")
    if policy.require_secagg and not bool(OmegaConf.select(cfg, "fl.secagg.enabled")):
        raise SitePolicyError(f"site {site} requires secure aggregation (node config "
                              "require-secagg); this run has fl.secagg.enabled=false")
    p = cfg.privacy
    if kind == "dp":
        if _given(cfg, "privacy.delta") and _number(cfg, "privacy.delta") > policy.delta:
            raise SitePolicyError(f"privacy.delta={p.delta} is weaker than this site's delta "
                                  f"{policy.delta:g} (node config delta)")
        if policy.max_grad_norm is not None and _given(cfg, "privacy.max_grad_norm") and \
                _number(cfg, "privacy.max_grad_norm") > policy.max_grad_norm:
            raise SitePolicyError(f"privacy.max_grad_norm={p.max_grad_norm} > this site's "
                                  f"{policy.max_grad_norm:g} (node config max-grad-norm)")
        if p.get("noise_multiplier") is not None:
            check_noise(_number(cfg, "privacy.noise_multiplier"), policy)
    if kind == "central_dp" and required == "central_dp":
        if str(p.get("side", "server")) != "client":
            raise SitePolicyError("privacy.side=server: the site would send its raw update (the "
                                  "server clips it); this site requires privacy.side=client")
        if _number(cfg, "privacy.clipping_norm") > policy.clip_norm:
            raise SitePolicyError(f"privacy.clipping_norm={p.clipping_norm} > this site's "
                                  f"clip-norm {policy.clip_norm:g}")
        check_noise(_number(cfg, "privacy.noise_multiplier"), policy)


def _given(cfg: DictConfig, key: str) -> bool:
    """Whether the config has ``key`` at all (a null value counts as given)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def check_noise(noise: float, policy: SitePolicy) -> None:
    """A noise multiplier below the site's floor is refused."""
    if not noise >= policy.min_noise_multiplier:
        raise SitePolicyError(f"noise multiplier {noise:.4g} < this site's minimum "
                              f"{policy.min_noise_multiplier:g} (node config min-noise-multiplier)")
