"""What the dataset generators (`ldm_app.data.shapes`, `ldm_app.data.photos`) share: the rule for `--out`, the
common argument checks, and the atomic write of a folder with a manifest of every file it holds.

`--out` may be a missing path, an empty folder, or a folder that is exactly an earlier output of the same generator:
its manifest (`written_by` + every file's size and SHA-256) valid, no file it does not list, no listed file changed.
Anything else is refused with a one-line error before any image is drawn, so a folder holding files the generator
did not write (a real dataset, a user's notes) is never replaced. The new folder is built next to `--out` and
renamed into place (`fileio.atomic_dir`), so an interrupted run leaves `--out` as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_app import limits
from ldm_app.errors import UserError, raise_if_stopped
from ldm_app.fileio import atomic_dir, check_replaceable_dir, file_sha256, read_written_record, some_entries

MIN_RESOLUTION = 16
EXPECTED = "a new path, an empty folder, or a folder written by this generator"


@dataclass
class Writer:
    """Files written into the temporary folder, recorded for the manifest."""

    folder: Path
    files: dict[str, dict] = field(default_factory=dict)

    def write(self, name: str, data: bytes) -> None:
        raise_if_stopped()  # a SIGTERM/Ctrl-C that numpy swallowed while this item was made (ldm_app.errors)
        (self.folder / name).write_bytes(data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class GeneratedFolder:
    """One generator's output folder: `manifest_file` names its manifest, `written_by` the command that wrote it,
    `example` a path shown when --out has no name of its own (e.g. "DIR/shapes")."""

    manifest_file: str
    written_by: str
    example: str

    def refuse(self, out: Path, why: str) -> UserError:
        return UserError(f"--out {out} {why}; refusing to replace it: expected {EXPECTED}")

    def check_previous_output(self, out: Path) -> None:
        """Return if the non-empty folder `out` is exactly an earlier output of this generator (a valid manifest
        and nothing it does not list, no listed file changed), else raise a UserError naming what is not."""
        manifest = out / self.manifest_file
        if manifest.is_symlink() or not manifest.is_file():
            raise self.refuse(out, f"is a folder not written by this generator (no {self.manifest_file}; it holds "
                              f"{some_entries(out)})")
        files = read_written_record(manifest, self.written_by)
        if files is None:
            raise self.refuse(out, f"has an unreadable {self.manifest_file}")
        for entry in sorted(out.iterdir()):  # the generators write plain files only, no subfolders
            name = entry.name
            if name == self.manifest_file:
                continue
            if entry.is_symlink() or not entry.is_file() or name not in files:
                raise self.refuse(out, f"holds {name}, which the generator did not write")
            if entry.stat().st_size != files[name]["bytes"] or file_sha256(entry) != files[name]["sha256"]:
                raise self.refuse(out, f"holds {name}, changed since the generator wrote it")

    def check_out(self, out: Path) -> None:
        """What `--out` must be (see the module docstring), checked before anything is drawn."""
        if out.name in ("", ".", ".."):
            raise UserError(f"--out {out} has no folder name of its own: give a path like {self.example}")
        check_replaceable_dir(out, EXPECTED, self.check_previous_output)

    @contextmanager
    def writing(self, out: Path, arguments: dict[str, Any]) -> Iterator[Writer]:
        """Build the folder in a temporary one next to `out`; on success write the manifest (`arguments`: the
        generator's arguments, recorded as given, possibly filled in by the caller inside the block), check `out`
        again just before the swap (it may have changed while the images were drawn) and rename into place."""
        with atomic_dir(out) as tmp:
            writer = Writer(tmp)
            yield writer
            manifest = {"written_by": self.written_by, "arguments": arguments, "files": writer.files}
            (tmp / self.manifest_file).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                                  encoding="utf-8")
            self.check_out(out)


def check_counts(num_images: int, resolution: int, seed: int) -> None:
    """--num_images, --resolution (at least MIN_RESOLUTION, at most the max_image_side limit) and --seed."""
    if num_images < 1:
        raise UserError(f"--num_images must be at least 1, got {num_images}")
    if resolution < MIN_RESOLUTION:
        raise UserError(f"--resolution must be at least {MIN_RESOLUTION} pixels, got {resolution}")
    max_side = limits.current().max_image_side
    if resolution > max_side:
        raise UserError(
            f"--resolution is {resolution} pixels, above the limit of {max_side} "
            f"(max_image_side; set {limits.ENV_PREFIX}MAX_IMAGE_SIDE to change it)"
        )
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")


def add_common_arguments(parser: Any) -> None:
    """--out, --num_images, --resolution and --seed, as every generator takes them."""
    parser.add_argument(
        "--out", required=True, help="a new or empty folder, or an earlier output of this generator (replaced)"
    )
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument(
        "--resolution", type=int, default=64,
        help=f"image side in pixels (>= {MIN_RESOLUTION}, at most the max_image_side limit)",
    )
    parser.add_argument("--seed", type=int, default=0)
