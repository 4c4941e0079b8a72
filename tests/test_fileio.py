"""Atomic writes under a full disk or a read-only place: one UserError naming the path, no temporary file left."""

from __future__ import annotations

import errno
import os

import pytest

from ldm_app.errors import UserError
from ldm_app.fileio import atomic_dir, atomic_path, atomic_write_text, write_errors


def test_full_disk_file_write_is_one_line_error_and_leaves_nothing(small_disk):
    dest = small_disk / "big.bin"
    with pytest.raises(UserError, match=r"cannot write .*big\.bin: No space left on device"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"\0" * (4 * 2**20))
    assert os.listdir(small_disk) == []


def test_full_disk_folder_write_keeps_the_old_folder(small_disk):
    dest = small_disk / "model"
    dest.mkdir()
    (dest / "weights").write_bytes(b"old")
    with pytest.raises(UserError, match="No space left on device"):
        with atomic_dir(dest) as tmp:
            (tmp / "weights").write_bytes(b"\0" * (4 * 2**20))
    assert sorted(os.listdir(small_disk)) == ["model"]
    assert (dest / "weights").read_bytes() == b"old"


def test_read_only_destination_is_one_line_error(readonly_dir):
    with pytest.raises(UserError, match=r"cannot write .*note\.txt: Read-only file system"):
        atomic_write_text(readonly_dir / "note.txt", "hi")
    with pytest.raises(UserError, match="Read-only file system"):
        with atomic_dir(readonly_dir / "sub"):
            pass


def test_enospc_from_any_write_becomes_user_error_without_a_mount(tmp_path):
    # the same path, without needing root: an OSError with errno ENOSPC raised inside the block
    with pytest.raises(UserError, match=r"cannot write .*x: No space left on device"):
        with write_errors(tmp_path / "x"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(UserError, match="No space left"):
        with write_errors(tmp_path / "y"):
            open("/dev/full", "wb").write(b"\0" * 65536)  # the kernel's always-full device


def test_other_os_errors_stay_bugs(tmp_path):
    with pytest.raises(FileNotFoundError):
        with write_errors(tmp_path / "x"):
            raise FileNotFoundError(errno.ENOENT, "gone")


def test_safetensors_write_failures_are_recognised(tmp_path):
    # safetensors raises its own exception type (not an OSError), with the OS error inside its message
    from safetensors import SafetensorError

    message = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    with pytest.raises(UserError, match=r"cannot write .*w\.safetensors: No space left on device"):
        with write_errors(tmp_path / "w.safetensors"):
            raise SafetensorError(message)
    with pytest.raises(UserError, match="Read-only file system"):
        with write_errors(tmp_path / "w.safetensors"):
            raise SafetensorError('IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: "Read-only" })')
    with pytest.raises(SafetensorError):  # a corrupt header is not the user's disk
        with write_errors(tmp_path / "w.safetensors"):
            raise SafetensorError("Error while deserializing header: HeaderTooLarge")


def test_real_safetensors_save_on_a_full_disk(small_disk):
    import torch
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="No space left on device"):
        with atomic_path(small_disk / "w.safetensors") as tmp:
            save_file({"w": torch.zeros(2**20)}, str(tmp))  # 4 MiB on a 2 MiB disk
    assert os.listdir(small_disk) == []


def test_folder_swap_is_not_blocked_by_a_stale_old_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "a").write_text("old")
    stale = tmp_path / f".model.old-{os.getpid()}"  # what an earlier version left when killed mid-swap
    stale.mkdir()
    (stale / "junk").write_text("x")
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("new")
    assert (dest / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", stale.name])


def test_atomic_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
