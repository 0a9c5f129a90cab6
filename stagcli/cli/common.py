"""Shared CLI plumbing: consoles, one-line errors with exit code 2, progress bars."""
from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import StagError

console = Console()
err_console = Console(stderr=True)


def handles_errors(command):
    """StagError (and bad values) -> 'error: ...' on one line, exit code 2, no traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StagError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def comma_list(*values) -> list[str]:
    """'a,b' 'c' -> ['a', 'b', 'c'] (options that take comma-separated and/or repeated values)."""
    return [part.strip() for value in values if value for part in value.split(",") if part.strip()]


def progress_bar(*extra_columns, transient=False) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    *extra_columns, console=err_console, transient=transient)
