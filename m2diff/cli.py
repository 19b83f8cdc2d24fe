"""``m2diff <command> [key=value ...]``: parse, compose the config, call one function.

The key=value words are Hydra overrides of conf/ (``model=paper train.steps=500``), plus a
few shorthands per command (``data=DIR`` for ``data.path=DIR``; ``m2diff generate sites=3``
for ``generate.sites=3``) and per-command arguments that are not settings (``checkpoint=``).
Errors a user can fix end as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from m2diff.config import ConfigError, compose, group_options


class UsageError(ValueError):
    """A command-line mistake; printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    target: str  # "module:function", function(cfg: DictConfig, args: dict[str, str]) -> int
    args: dict[str, str] = field(default_factory=dict)  # name -> help; not Hydra settings
    required: tuple[str, ...] = ()
    section: str | None = None  # bare keys of this config section need no prefix
    aliases: dict[str, str] = field(default_factory=dict)  # key -> override key
    keys: tuple[str, ...] = ()  # settings worth listing in --help
    sweep: bool = False  # function(overrides: list[str], args) gets the words uncomposed (multirun)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "generate",
            "Write simulated multi-site PET/MRI cohorts (NIfTI, the docs/METHOD.md layout).",
            "m2diff.data.generate.command:run_generate",
            section="generate",
            aliases={"size": "generate"},
            keys=("out", "sites", "subjects", "seed", "size=tiny|default", "shape",
                  "angles", "counts", "mlem_iters", "site_profiles"),
        ),
        Command(
            "check",
            "Validate site folder(s): one line per problem; exit 1 when nothing usable remains.",
            "m2diff.data.check:run_check",
            keys=("data",),
        ),
        Command(
            "prepare",
            "A raw export (DICOM or NIfTI, native grids) -> a checked site: register, resample, QC.",
            "m2diff.prepare.command:run_prepare",
            section="prepare",
            keys=("src", "out", "participants", "prepare.registration.min_nmi",
                  "prepare.roles.t1|ld|sd", "data.require_sd"),
        ),
        Command(
            "figure",
            "PNG of generated subjects: T1 / LD / SD for a CN and an AD subject.",
            "m2diff.data.generate.figure:run_data_figure",
            args={"png": "output PNG path (default <out>/subjects.png)"},
            keys=("data", "out"),
        ),
        Command(
            "train",
            "Train locally (centralised) on one or more site folders.",
            "m2diff.train_command:run_train",
            keys=("data", "model=tiny|paper|unet|ddpm_concat", "train.steps",
                  "train.batch_size", "train.lr", "out", "device", "seed"),
        ),
        Command(
            "enhance",
            "Enhance one low-dose PET volume (optionally without MRI); writes NIfTI in input units.",
            "m2diff.enhance:run_enhance",
            args={
                "ldpet": "low-dose PET NIfTI (required)",
                "t1": "co-registered T1 NIfTI (omit for MRI-free enhancement)",
                "checkpoint": "checkpoint .pt written by train/simulate (required)",
                "out": "output NIfTI path (required); <out>_std.nii.gz holds the uncertainty",
            },
            required=("ldpet", "checkpoint", "out"),
            aliases={"samples": "sample.samples", "steps": "sample.steps",
                     "sampler": "sample.sampler"},
            keys=("sample.sampler=ddim|ddpm", "sample.steps", "sample.samples", "device"),
        ),
        Command(
            "evaluate",
            "Per-subject, per-cohort and per-site metrics (PSNR, SSIM, NMSE, SUVR bias) on held-out subjects.",
            "m2diff.evaluate:run_evaluate",
            args={"checkpoint": "checkpoint .pt (omit to report the LD input only)",
                  "split": "test | val | train | all (default test)"},
            keys=("data", "out", "sample.steps", "device"),
        ),
        Command(
            "simulate",
            "Simulate a whole federation on this machine (Flower simulation engine); -m: sweep (bench).",
            "m2diff.simulate:run_simulate",
            aliases={"mode": "fl.mode", "rounds": "fl.rounds", "sites": "fl.sites"},
            keys=("fl.mode=federated|centralized|local|all", "fl.rounds", "fl.sites",
                  "fl.strategy", "train.steps", "model", "out", "fl.num_cpus",
                  "fl.num_gpus", "fl.ray_address"),
        ),
        Command(
            "bench",
            "Sweep settings (Hydra multirun: key=a,b); federated vs centralised vs local per site.",
            "m2diff.bench.command:run_bench",
            args={"plan": "true: list the runs and which are done; run nothing"},
            aliases={"mode": "fl.mode", "rounds": "fl.rounds", "sites": "fl.sites"},
            keys=("fl.mode=federated,centralized,local (default) | all", "out (default runs/bench)",
                  "model", "fl.strategy", "privacy", "fl.rounds", "train.steps",
                  "generate=tiny|default|realistic|realistic_tiny", "generate.sites",
                  "generate.subjects", "generate.dose", "generate.psf_mm", "generate.t1_contrast",
                  "generate.ad_fraction", "generate.label_skew", "fl.ray_address"),
            sweep=True,
        ),
    ]
}


def _usage() -> str:
    lines = ["usage: m2diff <command> [key=value ...]", "", "commands:"]
    lines += [f"  {c.name:<10} {c.help}" for c in COMMANDS.values()]
    lines += ["", "key=value words are Hydra overrides of conf/ (e.g. model=paper train.steps=500).",
              "m2diff <command> --help lists a command's keys."]
    return "\n".join(lines)


def _command_usage(cmd: Command) -> str:
    lines = [f"usage: m2diff {cmd.name} [key=value ...]", "", cmd.help]
    if cmd.args:
        lines += ["", "arguments:"]
        lines += [f"  {k}=...{' (required)' if k in cmd.required else ''}  {v}"
                  for k, v in cmd.args.items()]
    if cmd.keys:
        lines += ["", "settings (any key of conf/ works; these matter most here):"]
        lines += [f"  {k}" for k in cmd.keys]
    groups = {g: group_options(g) for g in ("model", "train", "fl", "privacy", "generate", "export")}
    lines += ["", "config groups: " + "; ".join(f"{g}={'|'.join(o)}" for g, o in groups.items() if o)]
    return "\n".join(lines)


def split_words(cmd: Command, words: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split key=value words into Hydra overrides and command arguments."""
    overrides: list[str] = []
    args: dict[str, str] = {}
    section_keys: set[str] = set()
    if cmd.section:
        section_keys = set(compose([]).get(cmd.section, {}).keys())
    data_options = set(group_options("data"))
    for word in words:
        key, sep, value = word.partition("=")
        bare = key.lstrip("+~")
        if not sep or not bare:
            raise UsageError(f"'{word}' is not key=value (see m2diff {cmd.name} --help)")
        if bare in cmd.args:
            args[bare] = value
        elif bare in cmd.aliases:
            overrides.append(f"{cmd.aliases[bare]}={value}")
        elif bare in section_keys:
            overrides.append(f"{cmd.section}.{bare}={value}")
        elif bare == "data" and value not in data_options:
            overrides.append(f"data.path={value}")
        else:
            overrides.append(word)
    missing = [k for k in cmd.required if k not in args]
    if missing:
        raise UsageError(f"m2diff {cmd.name} needs {', '.join(k + '=...' for k in missing)}")
    return overrides, args


def _resolve(target: str) -> Callable[..., int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, words = argv[0], argv[1:]
    if name == "simulate" and any(w in ("-m", "--multirun") for w in words):
        # Hydra's multirun flag: the bench sweeps
        name, words = "bench", [w for w in words if w not in ("-m", "--multirun")]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"m2diff: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    if any(w in ("-h", "--help") for w in words):
        print(_command_usage(cmd))
        return 0
    with contextlib.suppress(ValueError):  # not in the main thread (tests)
        # SIGTERM (a scheduler's, a container's stop) unwinds like Ctrl-C, so that the
        # SuperLink and Ray processes a simulation started are stopped, not orphaned
        signal.signal(signal.SIGTERM, _terminate)
    try:
        overrides, args = split_words(cmd, words)
        if cmd.sweep:
            return int(_resolve(cmd.target)(overrides, args) or 0)
        cfg = compose(overrides)
        return int(_resolve(cmd.target)(cfg, args) or 0)
    except (UsageError, ConfigError) as exc:
        print(f"m2diff {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m2diff {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
