"""Terminal output: rich progress bars on stderr, so stdout stays clean for --json."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def byte_progress(description: str, total_bytes: int, total_items: int | None = None, item_name: str = "tensors"):
    """A bar in bytes (with speed and ETA); `advance(nbytes, items=0)` moves it."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
               TransferSpeedColumn(), TextColumn("{task.fields[items]}"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and not _forced()) as p:
        done = [0]
        label = (lambda: f"{done[0]}/{total_items} {item_name}") if total_items else (lambda: "")
        task = p.add_task(description, total=total_bytes, items=label())

        def advance(nbytes: int, items: int = 0):
            done[0] += items
            p.update(task, advance=nbytes, items=label())
        yield advance


def _forced() -> bool:
    return "--progress" in sys.argv
