"""The preloader: the site's heavy libraries imported once, a fork per ClientApp task.

Flower 1.42 starts a fresh ClientApp process for every message a site gets. Importing torch,
MONAI and Flower in each took most of a deployed round (benchmarks/federation.py): seconds
per message on an idle 2-core machine, tens of seconds when three sites start together.
With app pinning (``m2diff-client allow-fab=...``), ``m2diff-superexec`` starts, next to
itself, a *preloader*: a single-threaded process that imports those third-party libraries
(never the app: its code comes from the FAB, after the allow-list check) and then waits on a
Unix socket in a private folder (mode 0700). For each task, ``m2diff-clientapp`` (the command
the SuperExec runs) passes its arguments and its stdin/stdout/stderr to the preloader, which
forks; the child runs exactly what ``m2diff-clientapp`` would (``app_pinning.clientapp_main``:
pull the task, check the FAB hash, run the app) and reports its exit status, which
``m2diff-clientapp`` exits with. Without a preloader (none started, or it died)
``m2diff-clientapp`` runs cold, as before.

Fork safety: the preloader refuses to serve (and exits) if importing left a Python thread
running besides its own; a child gets a copy of a process that has only imported modules
(the idle native pools of the BLAS libraries are fork-aware; torch's own thread pool is
created in the child, with the site's thread setting, on first use).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

# The protocol of client/warm_start.py (the caller's side; tests check they agree). Not
# imported from there: this process is started by path and imports none of the app's packages.
SOCKET_ENV = "M2DIFF_WARM_SOCKET"
EXIT_CODE = struct.Struct("!i")

# Third-party modules every ClientApp message imports (not the app itself: see module doc).
PRELOAD = ("numpy", "torch", "torch.utils.data", "torch._dynamo", "torch.optim",
           "monai.networks.nets", "monai.networks.blocks",
           "monai.networks.schedulers", "monai.metrics", "omegaconf", "hydra", "nibabel",
           "rich.progress", "flwr.app", "flwr.clientapp", "flwr.clientapp.mod",
           "flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp")


def preload() -> None:
    """Import ``PRELOAD``, and build one optimiser: torch imports its compiler stack
    (``torch._dynamo``, ~2-5 s) on the first optimiser of a process."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # the app imports what it needs itself
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        import torch

        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def _child(conn: socket.socket, argv: list[str], fds: list[int]) -> None:
    """In the forked child: become the ``m2diff-clientapp`` process that asked, run it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.pop(SOCKET_ENV, None)  # this process runs the app; it does not ask again
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    code = 0
    try:
        from client.app_pinning import clientapp_main

        sys.argv = ["m2diff-clientapp", *argv]
        clientapp_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(EXIT_CODE.pack(code))
        os._exit(code)


def serve(path: Path, parent: int) -> None:
    """The preloader: import, then fork one child per request until ``parent`` is gone."""
    preload()
    import threading

    if threading.active_count() > 1:
        print(f"m2diff warm start: {threading.active_count()} Python threads after importing; "
              "not forking, ClientApps start cold", file=sys.stderr)
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # (to remove the socket)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(16)
    server.settimeout(2.0)
    try:
        while os.getppid() == parent:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                try:
                    data, fds = _recv(conn)
                    argv = [str(a) for a in json.loads(data)]
                except (OSError, ValueError):
                    continue
                if os.fork() == 0:
                    server.close()
                    _child(conn, argv, fds)
                for fd in fds:
                    os.close(fd)
    finally:
        server.close()
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def _recv(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected stdin, stdout and stderr")
    return msg, list(fds)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (client/) is not a place to import from
    serve(Path(sys.argv[1]), int(sys.argv[2]))
