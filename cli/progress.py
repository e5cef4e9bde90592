"""The progress bar of the command line's long jobs (convert, lut build, reading experts in at load)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(label: str, unit: str = "", transient: bool = False, disable: bool = False):
    """A rich bar on stderr; yields the `progress(done, total)` callback that the library's long jobs take.

    Drawn from the first call on, so an error found before the work starts prints nothing but itself, and
    stopped at done == total, so it does not redraw over (or compete with) what comes after the job."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    if unit:
        columns.insert(3, TextColumn(unit))
    console = Console(stderr=True)
    # Off a terminal a bar draws once, when it stops; a transient one would leave just an empty line.
    disable = disable or (transient and not console.is_terminal)
    bar = Progress(*columns, console=console, transient=transient, disable=disable)
    task, running = None, False

    def progress(done: int, total: int) -> None:
        nonlocal task, running
        if task is None:
            bar.start()
            task, running = bar.add_task(label, total=total), True
        bar.update(task, completed=done)
        if running and done >= total:
            bar.stop()
            running = False

    try:
        yield progress
    finally:
        if running:
            bar.stop()
