"""Warm ClientApp processes, the caller's side (the preloader: client/preloader.py).

Flower 1.42 starts a fresh ClientApp process for every message a site gets. Importing torch,
MONAI and Flower in each took most of a deployed round (benchmarks/federation.py). With app
pinning (``m2diff-client allow-fab=...``), ``m2diff-superexec`` starts a preloader beside itself
(``start_preloader``) and ``m2diff-clientapp``, the command its SuperExec runs per task, asks
it to fork a child that runs the task (``run_warm``), or runs cold when there is none.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

SOCKET_ENV = "M2DIFF_WARM_SOCKET"
EXIT_CODE = struct.Struct("!i")  # the child's exit status, sent back on the socket


def run_warm(argv: list[str]) -> int | None:
    """Run this ``m2diff-clientapp`` call in a child of the preloader; its exit status, or
    None when there is no preloader to ask (the caller then runs cold)."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        socket.send_fds(sock, [json.dumps(argv).encode()], [0, 1, 2])
    except OSError:
        sock.close()
        return None
    with sock:
        data = b""
        while len(data) < EXIT_CODE.size:
            chunk = sock.recv(EXIT_CODE.size - len(data))
            if not chunk:
                return 1  # the child died without a status (killed)
            data += chunk
    return int(EXIT_CODE.unpack(data)[0])


def start_preloader() -> None:
    """Start the preloader beside this process (``m2diff-superexec``) and point the
    ``m2diff-clientapp`` processes it will start at it (``M2DIFF_WARM_SOCKET``)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="m2diff-warm-"))  # mode 0700
    path = folder / "clientapp.sock"
    # By path, not "-m client...": the preloader must not import the app's packages.
    subprocess.Popen([sys.executable, "-s", str(Path(__file__).with_name("preloader.py").resolve()),
                      str(path), str(os.getpid())], stdin=subprocess.DEVNULL)
    os.environ[SOCKET_ENV] = str(path)


