"""``m2diff bench [key=a,b ...]`` (also ``m2diff simulate -m ...``): sweep, run, summarise.

Runs every run of the sweep (m2diff.bench.sweep) one after the other in
``<out>/runs/<name>/`` (m2diff.bench.runs; finished ones are skipped), then writes under
``out`` (default ``runs/bench``): ``summary.csv`` / ``summary.md`` / ``answers.csv`` and
``summary.png`` (m2diff.bench.summary, m2diff.bench.figure) and ``bench.json`` (the words
and which run serves which setting and mode). Exit status 0 when every run is done, 1 when
one failed (the summary still covers the others), 2 for a bad word.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from m2diff.bench.figure import plot_bench
from m2diff.bench.runs import execute, is_done, run_folder
from m2diff.bench.summary import (
    answers,
    answers_markdown,
    psnr_markdown,
    summary_rows,
    write_summary,
)
from m2diff.bench.sweep import Setting, parse, plan, unique_runs
from m2diff.config import resolve_path
from m2diff.report import write_json

DEFAULT_OUT = "runs/bench"


def bench_root(words: list[str]) -> tuple[Path, list[str]]:
    """The bench folder (the ``out=`` word, default ``runs/bench``) and the words with it."""
    outs = [o.value() for o in parse(words) if o.key_or_group == "out"]
    if not outs:
        words = [f"out={DEFAULT_OUT}", *words]
    root = resolve_path(str(outs[-1]) if outs else DEFAULT_OUT)
    assert root is not None
    return root, words


def _truthy(value: str | None) -> bool:
    return str(value or "").lower() in ("1", "true", "yes")


def gather(root: Path, settings: list[Setting], results: dict[str, dict[str, Any]],
           words: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write the summary files and figure; return the summary rows and the answers
    (m2diff.bench.summary)."""
    rows = summary_rows(settings, results)
    table = answers(rows)
    header = ("# m2diff bench\n\n`m2diff bench " + " ".join(words) + "`\n\n"
              "Held-out test subjects of every site; PSNR / SSIM / NMSE inside the brain mask "
              "(data range from the SD image), SUVR bias of the AD regions vs the cerebellum, "
              "the LD input first. Same budget per mode: federated rounds x steps per site, "
              "centralised rounds x steps x sites on the pooled sites, local rounds x steps per site.")
    write_summary(root, rows, table, header)
    plot_bench(rows, root / "summary.png")
    write_json(root / "bench.json", {
        "words": words,
        "settings": [{"setting": s.label, "runs": {m: r.name for m, r in s.runs.items()}}
                     for s in settings]})
    return rows, table


def run_bench(words: list[str], args: dict[str, str]) -> int:
    """CLI entry (see the module doc)."""
    start = time.perf_counter()
    root, words = bench_root(list(words))
    settings = plan(words)
    runs = unique_runs(settings)
    done = [r for r in runs if is_done(root, r)]
    print(f"m2diff bench: {len(settings)} setting(s), {len(runs)} run(s), {len(done)} already "
          f"done; folder {root}", flush=True)
    if _truthy(args.get("plan")):
        for run in runs:
            state = "done" if run in done else "to run"
            print(f"  {state:<7} {run_folder(root, run)}  ({' '.join(run.swept)})")
        return 0
    results: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs, 1):
        label = " ".join(run.swept)
        if run in done:
            print(f"m2diff bench: [{i}/{len(runs)}] {label}: done before, skipped", flush=True)
        else:
            print(f"m2diff bench: [{i}/{len(runs)}] {label}: running in {run_folder(root, run)}",
                  flush=True)
        results[run.identity] = result = execute(run, root)
        if result.get("status") != "done":
            print(f"m2diff bench: [{i}/{len(runs)}] {label}: FAILED: {result.get('error')}",
                  flush=True)
        elif not result.get("skipped"):
            print(f"m2diff bench: [{i}/{len(runs)}] {label}: done in {result['wall_s']:.0f} s",
                  flush=True)
    rows, table = gather(root, settings, results, words)
    print("\n" + psnr_markdown(rows) + "\n")
    print(answers_markdown(table) + "\n")
    failed = [r for r in runs if results[r.identity].get("status") != "done"]
    print(f"m2diff bench: {len(runs) - len(failed)}/{len(runs)} run(s) done, {len(failed)} failed, "
          f"in {time.perf_counter() - start:.0f} s; summary {root / 'summary.md'}, figure "
          f"{root / 'summary.png'}", flush=True)
    return 0 if runs and not failed else 1
