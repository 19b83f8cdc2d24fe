"""Process plumbing shared by ``m2diff simulate``, ``m2diff-server`` and ``m2diff-client``.

Flower-free at import: it starts and stops Flower's executables (``flower-superlink``,
``flower-supernode``, the ``flwr`` CLI) and nginx as child processes and reads what they
print, but imports no Flower module. ``flower``: the ``flwr`` CLI, connections, a run's
outcome; ``procs``: process trees, ports, stopping; ``logs``: rotated log files, a child's
output, the console line; ``words``: the ``key=value`` words of every command.
"""

from __future__ import annotations


class FlowerError(RuntimeError):
    """A Flower command or process (or the nginx front beside the SuperLink) failed; the
    message says which and why."""
