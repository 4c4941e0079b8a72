"""Atomic file and folder writes: a reader (or a crash) never sees a half-written image or checkpoint.

Python's stdlib has no atomic-write helper; `os.replace` is atomic on POSIX within one file system, so we write
to a temporary name in the destination's own folder and rename it into place.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

# OSErrors that are the user's situation, not a bug: a full disk, a quota, a read-only or forbidden place.
# Not ENOENT: a missing folder mid-write is more often our bug (a folder not made) than the user's situation, so it
# keeps its traceback (tests/test_fileio.py); a pseudo file system such as /proc, which takes no new files, shows one.
USER_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                     errno.ENAMETOOLONG}


@contextlib.contextmanager
def write_errors(dest: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only or forbidden destination (and the like) while writing `dest` into one
    UserError line naming the path; any other error stays a bug with its traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        problem = write_problem(e)
        if problem is None:
            raise
        raise UserError(f"cannot write {dest}: {problem}") from None


def write_problem(e: BaseException) -> str | None:
    """What went wrong, in the OS's words, when `e` is a user's write situation (full disk, read-only...), else None.

    Python raises OSError; torch's writer a RuntimeError ("basic_ios::clear: iostream error", "file write failed");
    safetensors its own SafetensorError (neither), with the OS error inside the message:
    'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'.
    """
    if isinstance(e, OSError):
        return (e.strerror or str(e)) if e.errno in USER_WRITE_ERRNOS else None
    if not (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"):
        return None
    text = str(e)
    code = re.search(r"\bcode: (\d+)", text)
    if code and int(code.group(1)) in USER_WRITE_ERRNOS:
        return os.strerror(int(code.group(1)))
    lowered = text.lower()
    if any(s in lowered for s in ("no space left", "enospc", "iostream error", "file write failed")):
        return "No space left on device"
    return None


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
            with _named_as(tmp, dest):
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
            with _named_as(tmp, dest):
                yield tmp
            if dest.exists():
                # a fresh empty name (rename may replace an empty folder): a stale one left by a killed process
                # cannot block the swap
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _named_as(tmp: Path, dest: Path) -> Iterator[None]:
    """A UserError raised while writing into `tmp` names `dest`: the temporary name is ours, not the user's."""
    try:
        yield
    except UserError as e:
        if str(tmp) not in str(e):
            raise
        raise UserError(str(e).replace(str(tmp), str(dest))) from None


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only read by setting, which is process-wide: a
    file another thread creates in that instant would get umask 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:  # once per process, where /proc is missing
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- "written by us" records: a command replaces a folder only when it is exactly what the command wrote --------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_written_record(path: Path, written_by: str) -> dict[str, dict] | None:
    """The `files` of a JSON record `{"written_by": ..., "files": {name: {"bytes": int, "sha256": str}}}` that
    `written_by` wrote at `path`, or None when it is missing, a link, unreadable or malformed."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        ok = record.get("written_by") == written_by and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return files if ok else None


def some_entries(folder: Path) -> str:
    """'a, b, c and 4 more': what a folder holds, for an error message."""
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_replaceable_dir(out: Path, expected: str, check_previous: Callable[[Path], None]) -> None:
    """`out` may become a folder that `atomic_dir` writes: not a link, not a file or under one, not a mount point;
    if it is a non-empty folder, `check_previous(out)` must accept it (it raises otherwise). A probe then finds a
    read-only or forbidden place now (os.access does not, for root), before any slow work. `expected` says, in
    the error, what --out may be."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link (to {os.readlink(out)}): give the real folder path")
    existing = out
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder: give a path in a folder")
    if existing == out:
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder: expected {expected}")
        if os.path.ismount(out):
            raise UserError(f"--out {out} is a mount point, which cannot be replaced: give a folder inside it")
        if any(out.iterdir()):
            check_previous(out)
    with write_errors(out):
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent if existing == out else existing)).rmdir()


REPORT_SUFFIXES = {"--json": ".json", "--grid": ".png"}  # what an evaluation's report files are


def check_report_file(flag: str, dest: str | os.PathLike, overwrite: bool = False) -> None:
    """`check_output_file` for an evaluation's `--json` / `--grid`: the path ends in the report's suffix, and a file
    already there is replaced only with `--overwrite` (no command replaces what it did not write: a --json aimed at a
    dataset's metadata.jsonl, a user's notes.json or photo.png had been written over)."""
    dest = Path(dest)
    suffix = REPORT_SUFFIXES.get(flag)
    if suffix and dest.suffix.lower() != suffix:
        raise UserError(f"{flag} {str(dest)!r}: the report is {suffix[1:].upper()}; give a path ending in {suffix}")
    if dest.is_file() and not overwrite:
        raise UserError(f"{flag} {str(dest)!r} exists; pass --overwrite to replace it, or give another path")
    check_output_file(flag, dest)


def check_writable_folder(flag: str, folder: Path) -> None:
    """`folder` (given as `flag`, created later if missing) can receive files: its nearest existing ancestor is a
    writable folder. Nothing is made: a run refused later (a weak judge, a bad prompt) leaves no empty folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {folder}: {existing} is a file; expected a folder path for the output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {folder}: {existing} is not writable; choose another {flag}")


def check_report_folder(flag: str, folder: str | os.PathLike) -> None:
    """An evaluation's --out folder, before the work: not a file, and one whose files we may write (found at the
    first write, after minutes of sampling, it was a traceback)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {str(folder)!r} is a file; expected a folder for the report")
    check_writable_folder(flag, folder)


def check_output_file(flag: str, dest: str | os.PathLike) -> None:
    """Fail before a long job, not after it, when the file `dest` (given as `flag`) cannot be written: a folder in
    its place, a file where one of its folders should be, or a folder we may not write into (one UserError line)."""
    dest = Path(dest)
    if dest.is_dir():
        raise UserError(f"{flag} {str(dest)!r} is a folder; expected a file path")
    for parent in dest.parents:  # mkdir would raise FileExistsError, which is no write problem of the OS
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {flag} {str(dest)!r}: {str(parent)!r} is a file, not a folder")
            break
    with write_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest.parent):
            pass
