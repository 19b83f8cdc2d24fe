"""``m2diff-server status``: the SuperNodes, the run and each site's last metrics.

Reads what m2diff-server and the ServerApp left in the out-dir (server.json, rounds.json,
sites.json) and asks the SuperLink (``flwr supernode list``, ``flwr ls``) with a temporary
flwr configuration; changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

from m2diff.config import ConfigError, resolve_path
from m2diff.ops import FlowerError
from m2diff.ops.flower import private_federation, run_outcome
from m2diff.ops.words import truthy
from server.runstate import STATE_FILE, clock, read_rows, read_state


def _reported_sites(out: Path) -> dict[str, str]:
    """node id -> site name as the sites' own replies told the ServerApp (out/sites.json)."""
    from server.checkpoint import SITES_FILE

    try:
        return {str(k): str(v) for k, v in json.loads((out / SITES_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _node_rows(nodes: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for node in nodes:
        status = str(node.get("status", "?"))
        if status == "online":
            seen = "now"
        elif node.get("offline-at") not in (None, "", "N/A"):
            seen = str(node["offline-at"])
        else:
            seen = "never"
        rows.append(
            {
                "node id": str(node.get("node-id")),
                "site": names.get(str(node.get("node-id")), "?"),
                "status": status,
                "last seen": seen,
                "online since": str(node.get("online-at", "") or "").replace("N/A", "-"),
            }
        )
    return sorted(rows, key=lambda r: (r["status"] != "online", r["site"]))


def _site_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each site's rows of the last round it answered."""
    last: dict[str, int] = {}
    for r in rows:
        last[str(r["site"])] = max(last.get(str(r["site"]), 0), int(r["round"]))
    out = []
    for r in rows:
        if int(r["round"]) == last[str(r["site"])] and int(r.get("n", 0) or 0) > 0:
            out.append(
                {
                    "site": r["site"],
                    "round": int(r["round"]),
                    "cohort": r["cohort"],
                    "n": int(r.get("n", 0)),
                    "psnr": r.get("psnr"),
                    "ssim": r.get("ssim"),
                    "nmse": r.get("nmse"),
                    "suvr_bias_pct": r.get("suvr_bias"),
                    "train loss": r.get("train_loss"),
                }
            )
    return sorted(out, key=lambda r: (r["site"], r["cohort"]))


def _pid_alive(pid: Any) -> bool:
    return bool(pid) and Path(f"/proc/{int(pid)}").exists()


def status(args: dict[str, str]) -> int:
    """Print the SuperNodes, the run and each site's last metrics; 0 when the SuperLink answered."""
    from m2diff.report import print_table as rich_table

    out = resolve_path(args.get("out") or "runs/federated")
    assert out is not None
    state = read_state(out)
    address = args.get("address") or state.get("address") or f"127.0.0.1:{args.get('port', 8000)}"
    insecure = truthy(args["insecure"]) if "insecure" in args else bool(state.get("insecure"))
    ca = resolve_path(args.get("ca") or state.get("ca"))
    if not insecure and (ca is None or not ca.is_file()):
        raise ConfigError(f"no CA certificate for {address}: give ca=CA.crt (or insecure=true)")
    rows = read_rows(out)
    ctl = private_federation("m2diff", address, ca, insecure=insecure)
    try:
        reason = ""
        try:
            nodes: list[dict[str, Any]] | None = ctl.nodes()
        except (FlowerError, ValueError, subprocess.TimeoutExpired) as exc:
            nodes = None
            reason = str(exc).strip().splitlines()[-1][:200]
        row = None
        if nodes is not None and state.get("run_id"):
            with contextlib.suppress(FlowerError, ValueError, subprocess.TimeoutExpired):
                row = ctl.status(int(state["run_id"]))
    finally:
        ctl.close()
    running = _pid_alive(state.get("pid"))
    print(
        f"SuperLink {address} ({'plain HTTP' if insecure else 'TLS'}): "
        f"{'answers' if nodes is not None else 'does not answer (' + reason + ')'}; "
        f"m2diff-server {'running, pid ' + str(state['pid']) if running else 'not running'}"
    )
    if state.get("front"):
        front_up = running and _pid_alive(state.get("front_pid"))
        print(f"public front (nginx, Fleet API only) {state['front']}: "
              f"{'running, pid ' + str(state['front_pid']) if front_up else 'not running'}"
              + (f"; app (FAB) sha256 {state['app_sha256']}" if state.get("app_sha256") else ""))
    if nodes is not None:
        online = sum(1 for n in nodes if n.get("status") == "online")
        rich_table(
            _node_rows(nodes, {**dict(state.get("nodes") or {}), **_reported_sites(out)}),
            f"SuperNodes: {online} online, {len(nodes)} known",
            ("node id", "site", "status", "last seen", "online since"),
        )
    done = max((int(r["round"]) for r in rows), default=0)
    total = state.get("rounds", "?")
    if state.get("run_id"):
        if row is not None:
            _, text = run_outcome(row)
            elapsed = f", elapsed {clock(float(row.get('elapsed', 0) or 0))}"
        else:
            text, elapsed = f"{state.get('status', '?')} (as m2diff-server last recorded it)", ""
        restarts = int(state.get("superlink_restarts", 0) or 0)
        runs = state.get("runs") or []
        print(
            f"run {state['run_id']}: {text}{elapsed}; round {done}/{total} done"
            + (f"; SuperLink restarts {restarts}" if restarts else "")
            + (
                f"; earlier runs for this out: {', '.join(map(str, runs[:-1]))}"
                if len(runs) > 1
                else ""
            )
        )
    else:
        print(f"no run recorded in {out / STATE_FILE}; round {done}/{total} done")
    sites = _site_rows(rows)
    if sites:
        rich_table(
            sites,
            f"Last metrics per site ({out / 'rounds.json'})",
            ("site", "round", "cohort", "n", "psnr", "ssim", "nmse", "suvr_bias_pct", "train loss"),
        )
    return 0 if nodes is not None else 1
