"""Pin the app a site runs: only Flower app bundles (FABs) whose hash the hospital allowed.

A Flower 1.42 SuperNode runs the ClientApp code of whatever FAB the coordinator's run carries
(the FAB's folder first on ``sys.path``), with the site's rights; ``--trusted-entities`` only
verifies apps signed through Flower's hub. ``flower-supernode --isolation process`` is the
hook: the SuperNode then starts no ClientApp itself, an executor of the site's choosing
acquires each task on the SuperNode's local Runtime API and starts the process that pulls
the message, context, run and FAB and runs the app. ``m2diff-client allow-fab=...`` starts
the SuperNode that way, plus two thin wrappers around Flower's own commands:

- ``m2diff-superexec``: Flower's ``flower-superexec``, acquiring only ClientApp tasks and
  starting ``m2diff-clientapp`` for them instead of ``flwr-clientapp``;
- ``m2diff-clientapp``: Flower's ``flwr-clientapp``, with one step added after the task input
  is pulled and before the FAB is installed or any of its code imported: the SHA-256 of the
  FAB's bytes must be in the allow-list (``M2DIFF_ALLOW_FAB``, comma-separated hex, set by
  m2diff-client; empty or absent: nothing is allowed) and equal to the hash the SuperLink
  gave it. Another app is refused: its message gets an error reply with Flower's
  ``INVALID_FAB`` code and the reason ``site-app-not-allowed``, nothing of the app runs, the
  site's log names the refused hash.

The hash is Flower's own FAB hash: ``sha256(fab_bytes).hexdigest()`` where ``fab_bytes`` is
what ``flwr.cli.build.build_fab_from_disk`` makes of the app folder (what ``flwr run APP``
submits and the SuperLink records as the run's ``fab_hash``; ``flwr build`` names its file
after its first 8 digits). The build is reproducible: files filtered by ``.gitignore`` and
Flower's include/exclude patterns, sorted, every zip entry dated 2024-10-01. ``app_hash``
(``m2diff-client fab-hash [APP_DIR]``) computes it for a folder the hospital vetted.

No import of torch or of the app here: the check runs before anything of the FAB can.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from logging import INFO, WARNING
from pathlib import Path

ALLOW_ENV = "M2DIFF_ALLOW_FAB"
REFUSED = "site-app-not-allowed"
_HEX = re.compile(r"[0-9a-f]{64}")


class AppNotAllowed(RuntimeError):
    """The FAB of this task is not in the site's allow-list (its text is the fixed code)."""

    def __str__(self) -> str:
        return REFUSED


def fab_hash(content: bytes) -> str:
    """Flower's hash of a FAB: hex SHA-256 of its bytes."""
    return hashlib.sha256(content).hexdigest()


def app_hash(app_dir: str | os.PathLike) -> str:
    """The FAB hash ``flwr run APP_DIR`` submits for this folder (module doc)."""
    from flwr.cli.build import build_fab_from_disk

    return fab_hash(build_fab_from_disk(Path(app_dir)))


def parse_allow(text: str) -> frozenset[str]:
    """Hashes from ``sha256:HEX,HEX ...`` (commas, spaces or newlines; ``#`` comments);
    raises ValueError naming a word that is not 64 hex digits."""
    hashes = set()
    for line in text.splitlines():
        for word in re.split(r"[\s,]+", line.split("#", 1)[0]):
            if not word:
                continue
            digest = word.lower().removeprefix("sha256:")
            if not _HEX.fullmatch(digest):
                raise ValueError(f"{word!r} is not a sha256 hash (64 hex digits)")
            hashes.add(digest)
    return frozenset(hashes)


def read_allow_file(path: str | os.PathLike) -> frozenset[str]:
    """The hashes listed in a file (``parse_allow``); raises OSError / ValueError."""
    return parse_allow(Path(path).read_text())


def _checked_pull(original):  # type: ignore[no-untyped-def]
    """``pull_task_input`` of Flower's runtime, followed by the allow-list check."""
    def pull(client):  # type: ignore[no-untyped-def]
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode
        from flwr.supercore import log
        from flwr.supernode.runtime import run_clientapp as runtime

        message, context, run, fab = original(client)
        digest = fab_hash(fab.content)
        try:
            allowed = parse_allow(os.environ.get(ALLOW_ENV, ""))
        except ValueError:
            allowed = frozenset()
        if digest in allowed and fab.hash_str == digest:
            log(INFO, "m2diff-clientapp: app sha256 %s of run %s is allowed", digest, run.run_id)
            return message, context, run, fab
        log(WARNING, "m2diff-clientapp: refusing run %s: its app (sha256 %s, announced as %s) is "
            "not in this site's allow-list (%d hash(es)); none of its code runs; the coordinator "
            "gets %r", run.run_id, digest, fab.hash_str, len(allowed), REFUSED)
        reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=REFUSED), reply_to=message)
        runtime.push_message(client, reply, context)
        raise AppNotAllowed

    return pull


def clientapp_main() -> None:
    """``m2diff-clientapp``: ``flwr-clientapp`` with the FAB allow-list (module doc); run in a
    warm child of the site's preloader when there is one (client/warm_start.py)."""
    from client.warm_start import run_warm

    code = run_warm(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    runtime.pull_task_input = _checked_pull(runtime.pull_task_input)
    flwr_clientapp()


def superexec_main() -> None:
    """``m2diff-superexec``: ``flower-superexec`` for ClientApp tasks only, which it hands
    to ``m2diff-clientapp`` (the executable beside this Python, found by name otherwise)."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    from client.warm_start import start_preloader

    start_preloader()
    runner = Path(sys.executable).with_name("m2diff-clientapp")
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(runner) if runner.exists() else "m2diff-clientapp"
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
    flower_superexec()
