"""Helpers for tests that start real Flower processes on 127.0.0.1.

Every process is started in its own session (process group) and registered with a
``ProcessSet``; leaving its ``with`` block (also on failure) terminates every group it
started, by PID. Ports are picked free per process. TLS material (a CA and a server
certificate for IP:127.0.0.1 / DNS:localhost) is generated with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m2diff.ops import procs
from m2diff.ops.flower import Federation, flower_env, toml_pairs, tool, write_connection
from m2diff.ops.logs import LogSettings, file_logger
from m2diff.ops.procs import free_port, stop_group
from server.front import Front, FrontSettings

REPO = Path(__file__).resolve().parents[1]


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    procs.wait_port("127.0.0.1", port, proc, "process", timeout, poll_s=0.2)


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(folder: Path, sans: Sequence[str] = ("IP:127.0.0.1", "DNS:localhost")) -> Certs:
    """A CA and a server certificate (EC P-256) for ``sans`` (default 127.0.0.1 and localhost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m2diff test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(n[3:])) if n.startswith("IP:")
                else x509.DNSName(n.removeprefix("DNS:")) for n in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    out = Certs(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    out.ca.write_bytes(ca.public_bytes(pem))
    out.cert.write_bytes(cert.public_bytes(pem))
    out.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    return out


@dataclass
class ProcessSet:
    """Flower processes of one test; ``close()`` (or the with block) ends them all."""

    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> ProcessSet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(list(cmd), cwd=self.workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def failure_report(self, *names: str, keep: int = 40) -> str:
        """For an assertion message: from each named log, every line that says something
        went wrong or marks a protocol step (warnings, errors, SecAgg+ stages, messages
        sent and received), the last ``keep`` of them; the whole log is read, not its tail."""
        marks = ("WARN", "ERROR", "Stage", "Exit Code", "Traceback", "Error", "rror:",
                 "Receiving:", "Sending:", "done in", "timed out", "Secure aggregation")
        parts: list[str] = []
        for name in names:
            lines = [ln.strip() for ln in self.log(name).splitlines() if any(m in ln for m in marks)]
            parts += [f"--- {name}: {len(lines)} marked line(s), the last {keep} ---", *lines[-keep:]]
        return "\n".join(parts)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, grace_s=5)


@dataclass
class LocalFederation:
    """A deployment as m2diff-server makes it, on free ports: a SuperLink with TLS on
    127.0.0.1 only (``link_port``; the coordinator's ``ctl`` dials it) behind the public TLS
    front (nginx, server/front.py; ``port``, which SuperNodes dial), plus helpers to add
    SuperNodes and submit runs."""

    procs: ProcessSet
    certs: Certs
    port: int
    ctl: Federation
    superlink: subprocess.Popen
    link_port: int = 0
    front: Front | None = None

    @classmethod
    def start(cls, procs: ProcessSet, max_body_bytes: int = 16 * 2**20) -> LocalFederation:
        certs = make_certs(procs.workdir / "certs")
        port, link_port = free_port(), free_port()
        home = procs.workdir / "flwr-home"
        write_connection(home, "test", f"127.0.0.1:{link_port}", root_certificates=certs.ca)
        # One torch thread per process: several ClientApps share 2 cores here, and torch's
        # default (all cores each) oversubscribes them, 10-30x slower.
        env = flower_env(home, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        link = procs.start("superlink", [
            tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(link_port),
            "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
            "--ssl-keyfile", str(certs.key), "--disable-runtime-dependency-installation",
        ], env)
        wait_port(link_port, proc=link)
        front = start_front(procs, port, link_port, certs, max_body_bytes)
        return cls(procs, certs, port, Federation(home, "test", env), link, link_port, front)

    def supernode(self, name: str, node_config: dict[str, str]) -> subprocess.Popen:
        """A SuperNode for one site (own clientappio port), TLS to the public front."""
        return self.procs.start(name, [
            tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs.ca), "--port", str(free_port()),
            "--node-config", toml_pairs(node_config),
        ], self.ctl.env)


def start_front(procs: ProcessSet, port: int, link_port: int, certs: Certs,
                max_body_bytes: int, host: str = "127.0.0.1") -> Front:
    """The Fleet-only TLS front of m2diff-server (server/front.py) on ``host:port``, its log in
    ``procs.workdir/front.log``; stopped with the other processes."""
    settings = FrontSettings(host=host, port=port, link_port=link_port,
                             folder=procs.workdir / "front", max_body_bytes=max_body_bytes,
                             tls=(certs.ca, certs.cert, certs.key))
    front = Front(settings, file_logger(LogSettings(procs.workdir), "front"))
    front.start()
    assert front.proc is not None
    procs.procs.append(front.proc)
    return front
