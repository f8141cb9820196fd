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
    from rich.progress import Progress, ProgressColumn, Task

# what is running (scenario, policy, load), runs finished (a share of one under way counts), runs in this step
# (None: not known yet)
Status = Callable[[str, float, int | None], None]


def progress_bar(console: Console, label_width: int = 0) -> Progress:
    """Label (right-aligned to ``label_width``), bar, runs done of total, time elapsed and time remaining (a GPU
    replay or search runs for minutes: whoever waits should know how long)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # slow: lazy

    return Progress(
        TextColumn(f"{{task.description:>{label_width}}}" if label_width else "{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        eta_column(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def eta_column() -> ProgressColumn:
    """``ETA m:ss`` from the recent rate while a task with a known total runs; blank before there is a rate,
    without a total and once the task is done (the elapsed column then says how long it took)."""
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class Eta(TimeRemainingColumn):
        def render(self, task: Task) -> Text:
            if task.total is None or task.finished or task.time_remaining is None:
                return Text("")
            left = super().render(task)
            return Text(f"ETA {left.plain}", style=left.style)

    return Eta(compact=True)


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

    def __call__(self, what: str, done: float, total: int | None) -> None:
        self._bar.update(self._task, description=what, completed=done, total=total)
