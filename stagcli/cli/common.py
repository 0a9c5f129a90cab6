"""Shared CLI plumbing: consoles, one-line errors with exit code 2, progress bars."""
from __future__ import annotations

import errno
import functools
import os

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import StagError

console = Console()
err_console = Console(stderr=True)
DEBUG_ENV = "STAG_DEBUG"


def _one_line(err: BaseException) -> str:
    """What an unexpected exception says, on one line, with what the user can do about it."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {err.filename or ''}".rstrip() + \
            " (free some space; nothing half-written was kept)"
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or err}"
    if isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(err):
        return "out of memory (try a smaller --batch-size, --seq-len or --max-new-tokens)"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''} (unexpected; rerun with {DEBUG_ENV}=1 for the traceback)"


def handles_errors(command):
    """Every failure -> 'error: ...' on one line and exit code 2: StagError (bad input) as it is, any
    other exception summarised (STAG_DEBUG=1 shows its traceback instead)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001  (the CLI boundary: nothing escapes as a traceback)
            if not isinstance(err, StagError) and os.environ.get(DEBUG_ENV):
                raise
            message = str(err) if isinstance(err, StagError) else _one_line(err)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def comma_list(*values) -> list[str]:
    """'a,b' 'c' -> ['a', 'b', 'c'] (options that take comma-separated and/or repeated values)."""
    return [part.strip() for value in values if value for part in value.split(",") if part.strip()]


def progress_bar(*extra_columns, transient=False) -> Progress:
    # speed over the last 10 minutes: slow steps (minutes each on a CPU) still get an ETA
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    *extra_columns, console=err_console, transient=transient, speed_estimate_period=600)
