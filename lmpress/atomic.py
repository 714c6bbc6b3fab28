"""Atomic writes: a reader sees the old file or directory, or the complete new one, never half.

Everything is written under a temp name (`.<name>.<random>.tmp`) in the target's directory and
renamed into place on success; a failure removes the temp. A process killed with SIGKILL cannot
clean up, so `clean_temps` removes such leftovers before a run resumes. A full disk becomes a
one-line `LmpressError` naming the target, not a traceback from deep inside a writer.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmpress.errors import LmpressError

TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how writers that do not raise OSError (safetensors' Rust writer) spell a full disk
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28")


@contextmanager
def file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for any writer (torch.save, ...); it replaces `path` only
    if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory and an atomic rename."""
    with file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, path)
        raise


def is_temp(path: Path) -> bool:
    """True for the temp and replaced-old names this module creates."""
    return path.name.startswith(".") and path.name.endswith((TEMP_SUFFIX, OLD_SUFFIX))


def clean_temps(root: str | Path) -> list[Path]:
    """Remove temps that killed processes left under `root` (never complete, never read)."""
    removed = []
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts)):
        if is_temp(path) and path.exists():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    return isinstance(e, Exception) and any(w in str(e) for w in _FULL_WORDS)


def _raise_if_disk_full(e: BaseException, path: Path) -> None:
    if is_disk_full(e):
        raise LmpressError(
            f"{path}: no space left on device; nothing was written there (free space and re-run)"
        ) from e
