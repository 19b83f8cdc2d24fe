"""Log files and console lines of the long-running commands.

Our own lines and every Flower child's output go to size-rotated files
(RotatingFileHandler: NAME.log, NAME.log.1 .. NAME.log.BACKUPS), the children's through a
reader thread that also echoes them to the console unchanged. ``Say`` is a command's own
line: on the console with the command's name, and in its log file.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from m2diff.config import ConfigError, resolve_path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_FORMAT = "%(asctime)s %(message)s"
LEVEL_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # a command's own log file


@dataclass(frozen=True)
class LogSettings:
    """Where the log files go and how they rotate."""

    folder: Path
    max_bytes: int = 10 * 2**20
    backups: int = 5

    @classmethod
    def from_args(cls, folder: Path, max_mb: str | None, backups: str | None) -> LogSettings:
        """From ``log-max-mb=`` / ``log-backups=`` words (ValueError on nonsense)."""
        max_bytes = int(float(max_mb) * 2**20) if max_mb not in (None, "") else cls.max_bytes
        count = int(backups) if backups not in (None, "") else cls.backups
        if max_bytes < 1 or count < 1:
            raise ValueError("log-max-mb and log-backups must be positive")
        return cls(folder, max_bytes, count)


def log_settings(args: Mapping[str, str], default: Path) -> LogSettings:
    """``log-dir=`` (default ``default``), ``log-max-mb=``, ``log-backups=`` of a command's
    words; ConfigError on nonsense."""
    folder = resolve_path(args.get("log-dir")) or default
    try:
        return LogSettings.from_args(folder, args.get("log-max-mb"), args.get("log-backups"))
    except ValueError as exc:
        raise ConfigError(f"log-max-mb= / log-backups=: {exc}") from None


def file_logger(settings: LogSettings, name: str, fmt: str = LOG_FORMAT) -> logging.Logger:
    """A logger writing only to ``settings.folder/NAME.log``, rotated by size.

    Calling it again for the same file replaces the handler (no duplicated lines)."""
    settings.folder.mkdir(parents=True, exist_ok=True)
    path = (settings.folder / f"{name}.log").resolve()
    logger = logging.getLogger(f"m2diff.logfile.{path}")
    close_logger(logger)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=settings.max_bytes,
                                                   backupCount=settings.backups,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class Say:
    """A command's own lines: to the console (``NAME: ...``; to stderr with ``err``, in a
    rich ``style`` otherwise when given) and, with a timestamp, to its log file (WARNING
    with ``err``, else INFO)."""

    def __init__(self, name: str, logger: logging.Logger | None) -> None:
        self.name, self.logger = name, logger

    def __call__(self, text: str, err: bool = False, style: str | None = None) -> None:
        if style and not err:
            from rich.console import Console
            from rich.text import Text

            Console(file=sys.stdout, highlight=False, soft_wrap=True).print(
                Text(f"{self.name}: ", style="bold") + Text(text, style=style))
        else:
            print(f"{self.name}: {text}", file=sys.stderr if err else sys.stdout, flush=True)
        if self.logger is not None:
            self.logger.log(logging.WARNING if err else logging.INFO, "%s", text)


def pump(stream: IO[bytes], logger: logging.Logger, echo: IO[str] | None,
         watch: Callable[[str], None] | None = None) -> threading.Thread:
    """Copy a child's output line by line into ``logger`` (colour codes stripped) and, raw,
    to ``echo``; ``watch`` sees every stripped line. Returns the (daemon) thread, which ends
    at the child's EOF."""

    def _run() -> None:
        with contextlib.suppress(ValueError, OSError):
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if echo is not None:
                    with contextlib.suppress(ValueError, OSError):
                        echo.write(line)
                        echo.flush()
                text = ANSI.sub("", line).rstrip()
                if text:
                    logger.info("%s", text)
                    if watch is not None:
                        watch(text)

    thread = threading.Thread(target=_run, name=f"pump-{logger.name}", daemon=True)
    thread.start()
    return thread


def start_logged(cmd: list[str], logger: logging.Logger, echo: IO[str] | None,
                 watch: Callable[[str], None] | None = None,
                 **popen: Any) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` in a session of its own with stdout+stderr going through ``pump``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)
    assert proc.stdout is not None
    return proc, pump(proc.stdout, logger, echo, watch)
