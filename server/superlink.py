"""The coordinator's SuperLink: its command line (loopback only, TLS, SuperNode auth, its
database) and which of its failures are worth a restart.

Flower 1.42 serves the Control and ServerApp runtime APIs on the SuperLink's port without
checking the caller, so m2diff-server starts it on 127.0.0.1 and puts the public port on
an nginx front (server/front.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from m2diff.config import ConfigError, resolve_path
from m2diff.ops.flower import tool
from m2diff.ops.words import truthy

LOOPBACK_NAMES = ("IP:127.0.0.1", "DNS:localhost")  # what the certificate must also name
DATABASE_FILE = "superlink-state.db"
IN_MEMORY = ("memory", ":memory:", "none")


def database_path(args: dict[str, str], out: Path) -> Path | None:
    """The SuperLink's state file (None: in memory)."""
    value = args.get("database")
    if value is not None and value.lower() in IN_MEMORY:
        return None
    return resolve_path(value) if value else out / DATABASE_FILE


def auth_enabled(args: dict[str, str]) -> bool:
    """``auth=`` (default true). ``insecure=true`` needs an explicit ``auth=false``: Flower's
    SuperNode authentication needs TLS."""
    auth = truthy(args.get("auth", "true"))
    if truthy(args.get("insecure")) and auth:
        raise ConfigError("insecure=true needs auth=false (SuperNode auth needs TLS): give ca=, "
                          "cert=, key= instead, or add auth=false for a test")
    return auth


def tls_files(args: dict[str, str]) -> tuple[Path, Path, Path] | None:
    """(ca, cert, key) of ``ca=`` / ``cert=`` / ``key=``; None with ``insecure=true``. The
    certificate must also name the loopback SuperLink (``check_loopback_names``)."""
    if truthy(args.get("insecure")):
        return None
    files = {k: resolve_path(args.get(k)) for k in ("ca", "cert", "key")}
    missing = [k for k, v in files.items() if v is None or not v.is_file()]
    if missing:
        raise ConfigError(f"TLS needs existing files for {', '.join(k + '=' for k in missing)} "
                          "(deploy/make-certs.sh makes them; insecure=true for plain HTTP)")
    ca, cert, key = (files[k] for k in ("ca", "cert", "key"))
    assert ca is not None and cert is not None and key is not None
    check_loopback_names(cert)
    return ca, cert, key


def check_loopback_names(cert: Path) -> None:
    """The SuperLink listens on 127.0.0.1 with this certificate: this command's flwr CLI and
    the ServerApp dial it as 127.0.0.1 (IP SAN), the front verifies it as ``localhost``
    (nginx checks DNS names only). ConfigError naming what is missing."""
    from cryptography import x509

    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(f"cert={cert}: not a PEM certificate with subjectAltNames ({exc})") from None
    names = {f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)}
    names |= {f"DNS:{dns}" for dns in sans.get_values_for_type(x509.DNSName)}
    missing = [n for n in LOOPBACK_NAMES if n not in names]
    if missing:
        raise ConfigError(f"cert={cert} does not name {' and '.join(missing)}: the SuperLink listens "
                          "on loopback behind the TLS front, which dials it by those names. Re-issue "
                          "it with deploy/make-certs.sh (it adds them), keeping the CA")


def superlink_command(args: dict[str, str], port: int, database: Path | None = None) -> list[str]:
    """The SuperLink command line (Flower's, via m2diff-flower-superlink): loopback only (``port`` is the loopback port; the
    public port is the front's)."""
    cmd = [tool("m2diff-flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    auth = auth_enabled(args)
    tls = tls_files(args)
    if tls is None:
        cmd.append("--insecure")
    else:
        ca, cert, key = tls
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


LOST_SERVERAPP = "No heartbeat received from the task"
# A ServerApp ended by its own SuperLink answering 5xx on the runtime API (seen under load:
# SQLite's "database is locked" after its 5 s busy timeout); Flower's Grid does not retry it.
SUPERLINK_5XX = re.compile(r"ServerApp failed with exception: Server error '5\d\d [^']*' "
                           r"for url '[^']*/v1/runtime/")


def lost_serverapp(row: dict[str, Any]) -> bool:
    """A run that failed because its ServerApp was lost, not because the app raised: the
    process vanished without reporting (killed, out of memory) or its own SuperLink answered
    a runtime call with a 5xx. Worth resuming from the checkpoint. Any other ServerApp
    exception (a bad setting, no site trained, ...) is not."""
    details = str(row.get("status-details", "") or "").strip()
    return str(row.get("status")) == "finished:failed" and (
        details == LOST_SERVERAPP or bool(SUPERLINK_5XX.match(details)))
