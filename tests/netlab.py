"""Test hosts on one machine: Linux network namespaces joined by a bridge (ip netns + veth).

Each host gets its own namespace with loopback up and one address on a private test subnet;
nothing is routed off the machine. ``NetLab`` removes every namespace, veth and the bridge
on exit, also on failure. Needs root and iproute2; ``available()`` says whether it works.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.213.77"  # /24 on the lab bridge only


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> bool:
    """Whether this process may create network namespaces (root + iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"m2d-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError):
        return False
    _ip("netns", "del", probe)
    return True


@dataclass
class NetLab:
    """Hosts on a bridge: ``add(name)`` returns its address; ``exec_prefix(name)`` the
    command prefix that runs a program on that host."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (netns, address)

    @property
    def bridge(self) -> str:
        return f"m2b{self.tag}"

    def __enter__(self) -> NetLab:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for netns, _ in self.hosts.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def add(self, name: str) -> str:
        index = len(self.hosts) + 10
        netns, address = f"m2d-{self.tag}-{name}", f"{SUBNET}.{index}"
        outer, inner = f"m2v{self.tag}{index}", f"m2p{self.tag}{index}"
        self.hosts[name] = (netns, address)
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        _ip("addr", "add", f"{address}/24", "dev", inner, netns=netns)
        _ip("link", "set", inner, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        return address

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name][0]]
