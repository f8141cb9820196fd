"""Progress for long commands: a live line on the terminal saying what runs now and how far it got.

Long-running code reports through a plain callable, ``status(what, done, total)``, so the evaluation and
the capacity search know nothing about the terminal. Off a terminal (a pipe, a log file, CI) nothing is
drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

# what is running (scenario, policy, load), runs finished, runs in this step (None: not known yet)
Status = Callable[[str, int, int | None], None]


def progress_bar(console: Console, label_width: int = 0) -> Progress:
    """Label (right-aligned to ``label_width``), bar, runs done of total, time elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # slow: lazy

    return Progress(
        TextColumn(f"{{task.description:>{label_width}}}" if label_width else "{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


class Activity:
    """One live line that a long command updates as it moves from step to step; call it as a ``Status``."""

    def __init__(self, console: Console) -> None:
        self._bar = progress_bar(console)
        self._task = self._bar.add_task("preparing", total=None)

    def __enter__(self) -> Activity:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def __call__(self, what: str, done: int, total: int | None) -> None:
        self._bar.update(self._task, description=what, completed=done, total=total)
