"""``m2diff-flower-superlink``: Flower 1.42's ``flower-superlink``, with SQLite's busy timeout
raised from Flower's 5 s to 120 s.

m2diff-server keeps the SuperLink's state in a database file (so a restarted SuperLink keeps
its registered nodes and runs). Flower opens that file with ``PRAGMA busy_timeout = 5000``;
on a loaded 2-core coordinator, measured in the deployment test, a request that waited 5 s
for another thread's write failed with ``sqlite3.OperationalError: database is locked``, the
SuperLink answered 500, and Flower's own ServerApp and flower-superexec give up on a 500
(their HTTP retry covers 502-504 only): the run was lost, the SuperLink had to be restarted,
three to five times per test run. A longer wait is what SQLite's busy handler is for; nothing
else of Flower changes (same arguments, same process tree, same state format).
"""

from __future__ import annotations

BUSY_TIMEOUT_MS = 120_000


def main() -> None:
    import flwr.supercore.sql_mixin as sql_mixin

    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in pragmas:  # another Flower: say so rather than run unpatched
        raise SystemExit("m2diff-flower-superlink: this Flower has no busy_timeout pragma to raise; "
                         "check server/superlink_main.py against the installed flwr")
    pragmas["busy_timeout"] = str(BUSY_TIMEOUT_MS)
    sql_mixin.SQLITE_PRAGMAS = tuple(pragmas.items())

    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
