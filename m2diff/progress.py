"""The one rich progress bar style of m2diff (training steps, generated subjects, ...)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(*extra: str) -> Progress:
    """A bar: description, bar, done/total, ``extra`` text columns (rich format strings of
    the task, e.g. ``"loss {task.fields[loss]:.4f}"``), elapsed and remaining time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(text) for text in extra), TimeElapsedColumn(),
                    TimeRemainingColumn())
