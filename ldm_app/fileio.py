"""Atomic file and folder writes: a reader (or a crash) never sees a half-written image or checkpoint.

Python's stdlib has no atomic-write helper; `os.replace` is atomic on POSIX within one file system, so we write
to a temporary name in the destination's own folder and rename it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

# OSErrors that are the user's situation, not a bug: a full disk, a quota, a read-only or forbidden place.
USER_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                     errno.ENAMETOOLONG}


@contextlib.contextmanager
def write_errors(dest: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only or forbidden destination (and the like) while writing `dest` into one
    UserError line naming the path; other OSErrors stay bugs with their traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in USER_WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    except RuntimeError as e:  # torch/safetensors report a failed write as RuntimeError or SafetensorError
        if not _is_disk_full(e):
            raise
        raise UserError(f"cannot write {dest}: No space left on device") from None


def _is_disk_full(e: BaseException) -> bool:
    text = str(e).lower()
    return "no space left" in text or "enospc" in text or "iostream error" in text or "file write failed" in text


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to `dest`; on success rename it to `dest`, on error delete it."""
    dest = Path(dest)
    with write_errors(dest):
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any other file we write
            yield tmp
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `dest`; on success it replaces `dest` (an old `dest` is removed only
    after the new one is complete), on error the temporary folder is deleted and `dest` is untouched."""
    dest = Path(dest)
    with write_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
            yield tmp
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
