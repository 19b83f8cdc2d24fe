"""Scale benchmark: a federation of many sites over many rounds on Flower's simulation engine.

    .venv/bin/python benchmarks/scale.py [sites=20] [rounds=50] [marks=5,50] [key=value ...]

Generates ``sites`` tiny sites (``generate=tiny``, 4 subjects each; reused when present with
the same settings), then runs ``m2diff simulate``'s federated mode (``m2diff.simulate.
run_federated``: a simulation SuperLink, ``flwr run`` with one virtual SuperNode per site,
Ray scheduling them onto ``fl.num_cpus`` CPUs each) with the tiny M2Diff for ``rounds``
rounds of ``train.steps`` (default 2) local steps, evaluating every site every round.

While it runs, a sampler reads ``/proc/<pid>/status`` of every process below this one
(the SuperLink, Flower's SuperExec, the ``flwr-simulation`` process that runs the ServerApp
and drives Ray, Ray's raylet / GCS and its workers, among them the ``ClientAppActor``
processes that run every site's ClientApp) once a second, and when round r of ``marks``
lands in ``rounds.json`` it records each process's resident memory (VmRSS) and peak resident
memory so far (VmHWM). It prints, per kind of process, RSS and peak RSS at each mark (the
largest process of that kind, and how many there were), and the wall time per round at the
start and at the end (from the moments rounds.json gained each round; the ServerApp's own
train / evaluate phase times beside them).

Keys: ``sites``, ``rounds``, ``marks`` (comma-separated rounds), ``out`` (default
runs/benchmark-scale), ``sites_dir`` (default <out>/sites), ``sample_s`` (sampling period),
and any config override (``model=unet``, ``train.steps=5``, ``fl.num_cpus=2``,
``fl.ray_address=auto`` to run the sites on an existing Ray cluster; its workers are then not
below this process and are not measured). Writes ``<out>/scale.json`` and ``<out>/scale.md``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2diff.config import compose, resolve_path  # noqa: E402

DEFAULTS = ["model=tiny", "generate=tiny", "generate.subjects=4", "train.steps=2",
            "train.batch_size=8", "sample.steps=2", "device=cpu", "fl.min_sites=2"]
OWN = {"sites": "20", "rounds": "50", "marks": "", "out": "runs/benchmark-scale",
       "sites_dir": "", "sample_s": "1.0"}
# Process kinds by the start of the command line (program and script; Ray retitles a worker
# "ray::<actor or task>"), first match wins.
KINDS = (("site worker (ray::ClientAppActor)", r"^ray::ClientAppActor"),
         ("ServerApp (flwr-simulation)", r"^\S*python\S* \S*/flwr-simulation "),
         ("SuperLink", r"^\S*python\S* \S*/flower-superlink "),
         ("SuperExec", r"^\S*python\S* \S*/flower-superexec "),
         ("Ray raylet", r"^\S*/raylet "),
         ("Ray GCS", r"^\S*/gcs_server "),
         ("Ray agents, dashboard", r"^ray::\w*Agent|^\S*python\S* \S*/ray/dashboard/"),
         ("Ray worker, other", r"^ray::|^\S*python\S* \S*default_worker\.py"),
         ("Ray, other", r"^\S*python\S* \S*/ray/"),
         ("flwr CLI", r"^\S*python\S* \S*/flwr "))
MiB = 2**20


@dataclass
class Proc:
    """One sampled process: kind, command line and its memory (bytes) at its last sample."""

    pid: int
    kind: str
    rss: int = 0
    hwm: int = 0
    cmd: str = ""


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (not ``root`` itself)."""
    kids, out, todo = _children(), [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def command(pid: int) -> str:
    """The command line, words separated by spaces (with a trailing one), "" when gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").rstrip() + " "
    except OSError:
        return ""


def kind_of(cmd: str) -> str | None:
    """The process kind of a command line (KINDS), None for anything else."""
    for kind, pattern in KINDS:
        if re.search(pattern, cmd):
            return kind
    return None


@dataclass
class Sampler:
    """Samples the memory of every process below this one, and snapshots it at marks."""

    period_s: float = 1.0
    procs: dict[int, Proc] = field(default_factory=dict)
    snapshots: dict[int, list[Proc]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        for pid in descendants(os.getpid()):
            cmd = command(pid)
            kind = kind_of(cmd)  # again each time: a Ray worker is retitled once it hosts an actor
            if kind is None or kind == "flwr CLI":
                continue
            mem = _status(pid)
            if mem:
                proc = self.procs.setdefault(pid, Proc(pid, kind))
                proc.kind, proc.cmd = kind, cmd[:160]
                proc.rss, proc.hwm = mem.get("VmRSS", 0), max(proc.hwm, mem.get("VmHWM", 0))

    def snapshot(self, rnd: int) -> None:
        """Memory of the processes alive now (sampled just before)."""
        self.sample()
        alive = set(descendants(os.getpid()))
        self.snapshots[rnd] = [Proc(p.pid, p.kind, p.rss, p.hwm, p.cmd) for p in self.procs.values()
                               if p.pid in alive]

    def run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()


def watch_rounds(path: Path, sampler: Sampler, marks: Iterable[int], ends: dict[int, float],
                 stop: threading.Event) -> None:
    """Record when each round lands in ``rounds.json`` and snapshot memory at the marks."""
    marks = set(marks)
    while not stop.wait(0.5):
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for rnd in sorted({int(r["round"]) for r in rows} - set(ends)):
            ends[rnd] = time.monotonic()
            if rnd in marks:
                sampler.snapshot(rnd)


def memory_table(snapshots: dict[int, list[Proc]]) -> list[dict[str, Any]]:
    """Per process kind and mark: how many, the largest RSS and the largest peak RSS (MiB)."""
    rows = []
    kinds = list(dict.fromkeys(k for k, _ in KINDS if k != "flwr CLI"))
    for kind in kinds:
        row: dict[str, Any] = {"process": kind}
        for rnd, procs in sorted(snapshots.items()):
            mine = [p for p in procs if p.kind == kind]
            row[f"n@{rnd}"] = len(mine)
            row[f"rss@{rnd}"] = round(max((p.rss for p in mine), default=0) / MiB, 1)
            row[f"peak@{rnd}"] = round(max((p.hwm for p in mine), default=0) / MiB, 1)
        if any(row.get(f"n@{r}") for r in snapshots):
            rows.append(row)
    return rows


def round_times(ends: dict[int, float], start: float, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wall seconds per round (between rounds.json updates; round 1 from the run's start,
    so it includes starting Ray) with the ServerApp's train and evaluate phase times."""
    phases = {int(r["round"]): (float(r.get("round_train_s", 0)), float(r.get("round_evaluate_s", 0)))
              for r in rows}
    out, before = [], start
    for rnd in sorted(ends):
        train_s, eval_s = phases.get(rnd, (float("nan"), float("nan")))
        out.append({"round": rnd, "wall_s": round(ends[rnd] - before, 1),
                    "train_s": round(train_s, 1), "evaluate_s": round(eval_s, 1)})
        before = ends[rnd]
    return out


def _markdown(mem: list[dict[str, Any]], marks: list[int], times: list[dict[str, Any]]) -> str:
    head = ["process"] + [f"{w} @ round {m}" for m in marks for w in ("n", "RSS MiB", "peak RSS MiB")]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in mem:
        cells = [row["process"]] + [str(row.get(f"{k}@{m}", "")) for m in marks
                                    for k in ("n", "rss", "peak")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| round | wall s | ServerApp train phase s | evaluate phase s |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {t['round']} | {t['wall_s']} | {t['train_s']} | {t['evaluate_s']} |" for t in times]
    return "\n".join(lines)


def _window(times: list[dict[str, Any]], first: int, last: int) -> str:
    sel = [t["wall_s"] for t in times if first <= t["round"] <= last]
    return f"{sum(sel) / len(sel):.1f}" if sel else "-"


def main(argv: list[str]) -> int:
    from m2diff.ops import FlowerError
    from m2diff.report import _atomic_write, write_json
    from m2diff.simulate import ensure_sites, run_federated

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import parse

    overrides, own = parse(argv, overrides=DEFAULTS, own=OWN, own_keys=tuple(OWN), script="scale.py")
    sites_n, rounds = int(own["sites"]), int(own["rounds"])
    marks = sorted({int(m) for m in (own["marks"] or f"{min(5, rounds)},{rounds}").split(",")})
    out = resolve_path(own["out"])
    assert out is not None
    cfg = compose([*overrides, f"fl.rounds={rounds}", f"fl.sites={sites_n}", f"out={out}"])
    gen = cfg.generate.copy()
    gen.sites, gen.out = sites_n, str(resolve_path(own["sites_dir"]) or out / "sites")
    sites = ensure_sites(cfg, gen)
    run_dir = out / "federated"
    if (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"scale.py: {run_dir} holds an earlier run; remove it (the benchmark "
                         "measures a run from round 1)")
    load = os.getloadavg()
    print(f"scale.py: {len(sites)} sites x {rounds} rounds, {cfg.model.arch} "
          f"({cfg.train.steps} steps per round, batch {cfg.train.batch_size}), "
          f"fl.num_cpus={cfg.fl.num_cpus}, {os.cpu_count()} CPUs, load average before "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}", flush=True)
    sampler, ends, stop = Sampler(float(own["sample_s"])), {}, threading.Event()
    threads = [threading.Thread(target=sampler.run, daemon=True),
               threading.Thread(target=watch_rounds, daemon=True,
                                args=(run_dir / "rounds.json", sampler, marks, ends, stop))]
    start = time.monotonic()
    for t in threads:
        t.start()
    ok = True
    try:
        run_federated(cfg, sites, run_dir)
    except FlowerError as exc:
        print(f"scale.py: {exc}", flush=True)
        ok = False
    finally:
        time.sleep(1.0)  # let the watcher see the last rounds.json
        stop.set()
        sampler.stop()
    total = time.monotonic() - start
    rows = json.loads((run_dir / "rounds.json").read_text()) if (run_dir / "rounds.json").exists() else []
    times = round_times(ends, start, rows)
    mem = memory_table(sampler.snapshots)
    load_after = os.getloadavg()
    text = (f"{len(sites)} sites x {rounds} rounds, {cfg.model.arch}, {cfg.train.steps} steps per "
            f"site and round; {total:.0f} s in all; mean wall s per round: rounds 2-{min(5, rounds)} "
            f"{_window(times, 2, min(5, rounds))}, rounds {max(rounds - 4, 1)}-{rounds} "
            f"{_window(times, max(rounds - 4, 1), rounds)}; load average before "
            f"{load[0]:.1f}, after {load_after[0]:.1f} (1 min)\n\n"
            + _markdown(mem, sorted(sampler.snapshots), times) + "\n")
    print(text, flush=True)
    write_json(out / "scale.json", {"argv": argv, "overrides": overrides, "own": own,
                                    "memory": mem, "rounds": times, "total_s": total,
                                    "load_before": load, "load_after": load_after,
                                    "snapshots": {str(r): [p.__dict__ for p in procs]
                                                  for r, procs in sampler.snapshots.items()}})
    _atomic_write(out / "scale.md", lambda fh: fh.write(text))
    return 0 if ok and len(ends) >= rounds else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
