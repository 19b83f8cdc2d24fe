"""m2diff-server argument handling: the SuperLink command line, TLS checks (no processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from server.cli import main as server_main
from server.superlink import superlink_command

REPO = Path(__file__).resolve().parents[2]


def test_superlink_command_is_loopback_tls_auth_by_default_and_refuses_bad_combinations(
        tmp_path, capsys):
    from tests.flower_procs import make_certs

    certs = make_certs(tmp_path / "pki")  # SANs IP:127.0.0.1, DNS:localhost
    tls = {"ca": str(certs.ca), "cert": str(certs.cert), "key": str(certs.key)}
    cmd = superlink_command({**tls, "host": "0.0.0.0"}, 9000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # host= is the front's, never the SuperLink's
    assert "--ssl-certfile" in cmd and "--enable-supernode-auth" in cmd  # auth=true by default
    assert "--disable-runtime-dependency-installation" in cmd and "--insecure" not in cmd
    assert "--enable-supernode-auth" not in superlink_command({**tls, "auth": "false"}, 9000)
    assert server_main([f"out={tmp_path}/o"]) == 2  # no certificates given
    assert "insecure=true" in capsys.readouterr().err
    assert server_main([f"out={tmp_path}/o", "insecure=true"]) == 2  # auth is on by default
    assert "insecure=true needs auth=false" in capsys.readouterr().err
    assert server_main([f"out={tmp_path}/o", "insecure=true", "auth=false", "model=nope"]) == 2
    assert server_main([f"out={tmp_path}/o", "insecure=true", "auth=false",
                        "fl.strategy=fedtrimmedavg", "fl.min_sites=3"]) == 2
    assert "nothing would be trimmed" in capsys.readouterr().err


def test_a_certificate_without_the_loopback_names_is_refused(tmp_path, capsys):
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), str(tmp_path / "pki"),
                    "DNS:fl.example.org"], check=True, capture_output=True)
    pki = tmp_path / "pki"
    sans = subprocess.run(["openssl", "x509", "-in", str(pki / "superlink.crt"), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert "DNS:fl.example.org" in sans and "IP Address:127.0.0.1" in sans and "DNS:localhost" in sans
    # A certificate made without them (another tool): refused with what is missing.
    from tests.flower_procs import make_certs

    bare = make_certs(tmp_path / "bare", sans=["DNS:fl.example.org"])
    code = server_main([f"out={tmp_path}/o", f"ca={bare.ca}", f"cert={bare.cert}", f"key={bare.key}"])
    assert code == 2
    assert "does not name IP:127.0.0.1 and DNS:localhost" in capsys.readouterr().err
