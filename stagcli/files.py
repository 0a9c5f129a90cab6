"""Writing files so that nothing half-written is ever left under a real name.

Everything is written under a temporary name beside its target (`.NAME.stag-tmp-PID-XXXXXX`) and
renamed into place at the end. A process killed meanwhile leaves only such a name behind; the next
write to the same target removes the temporaries of processes that no longer run.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".stag-tmp-"


def temp_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path):
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(target: Path):
    """Remove temporaries of `target` left by processes that died (kill -9, power loss)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        pid = leftover.name.rsplit(TMP_MARK, 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(leftover)


@contextmanager
def _temporary(near, make=None):
    """A temporary path beside `near` (made by `make`, if given), removed at the end whatever happens."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(near)
    tmp = temp_path(near)
    if make is not None:
        make(tmp)
    try:
        yield tmp
    finally:
        remove(tmp)


@contextmanager
def new_file(path):
    """Yields a temporary path to write; renamed to `path` when the block ends without error."""
    with _temporary(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def scratch_dir(near):
    """A temporary directory named after `near` (beside it), removed at the end whatever happens."""
    return _temporary(near, Path.mkdir)


def write_text(path, text: str):
    with new_file(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def publish(tmp: Path, target: Path, replace: bool = False):
    """Rename a finished directory into place; an existing target is swapped out only with replace."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not replace:
            raise FileExistsError(target)
        old = temp_path(target)
        os.rename(target, old)  # out of the way first: target is never half old, half new
        os.rename(tmp, target)
        remove(old)
    else:
        os.rename(tmp, target)


@contextmanager
def new_dir(target, replace: bool = False):
    """Yields an empty temporary directory; when the block ends without error it becomes `target`
    (an existing `target` is replaced only with replace=True, and only once the new one is complete)."""
    with scratch_dir(target) as tmp:
        yield tmp
        publish(tmp, target, replace)


def move_into(source_dir: Path, out: Path, last: str = "config.json"):
    """Move every file of source_dir into out (replacing), `last` at the end: a directory whose
    `last` file exists holds complete files."""
    for f in sorted(Path(source_dir).iterdir(), key=lambda f: f.name == last):
        os.replace(f, Path(out) / f.name)
