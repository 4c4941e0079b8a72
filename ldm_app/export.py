"""Export a trained pipeline as a lean, shippable model folder.

    python -m ldm_app.export --model RUN_OR_MODEL_DIR --out DIR [--dtype fp16|fp32]
    python -m ldm_app.export --model RUN_OR_MODEL_DIR --out FILE.safetensors --single_file [--dtype fp16|fp32]
    python -m ldm_app.export --model RUN_OR_MODEL_DIR --out DIR --prune_vocabulary

`--prune_vocabulary` keeps only the CLIP tokens the model's training words need (its vocabulary.json) and the
matching rows of the text encoder's embedding table (ldm_app.prune_vocabulary): the same images for prompts in
those words, a much smaller text encoder and a tokenizer that loads in milliseconds.

A train_ldm.py output folder holds the pipeline next to checkpoints, logs and the latent cache; the export keeps
only the pipeline (safetensors), its sampling defaults (ldm_app.json), the training config (run_config.json) and
the training captions' words (vocabulary.json), optionally stored in fp16 to halve the size: the bundled default
model is such an export. Loading casts back to float32 unless a dtype is asked for
(LatentDiffusionPipeline.from_pretrained), so an fp16 folder runs on the CPU.

What `--out` may be (checked before the model is loaded, so a mistake costs nothing):

- a missing path or an empty folder: the export is written there (atomically: built in a temporary folder next
  to it, then renamed into place);
- a folder that is exactly a previous export: it is replaced atomically. An export is recognised by the file it
  writes last, `ldm_app_export.json`, which lists every file of the export with its size and SHA-256. The folder
  is "exactly a previous export" when that record is valid and the folder holds nothing else: no entry that is
  not listed (a checkpoint, a log, a user's file, a symbolic link) and no listed file whose bytes changed (a
  hand-edited ldm_app.json). Anything else is refused, and so is an export made before this record existed (the
  bundled model included): delete such a folder yourself or export to a new one. The record is a plain JSON file
  next to model_index.json; diffusers and `from_pretrained` ignore it.
- never the model itself, a folder inside it or a folder that contains it (resolved paths, so symbolic links
  count), nor a path that is itself a symbolic link, a file, or under a file.

With `--single_file` the export is one safetensors file in the CompVis/A1111 single-file layout of SD 1.x
(`ldm_app.single_file`; only the U-Net, VAE and text encoder: sampling defaults and run_config.json are not part of
that layout). `--out` is then a new file path ending .safetensors, never an existing entry (no file records that it
was written by an export, so none is replaced), nor inside the model folder; the file is written atomically.

Each refusal is one line (`error: ...`, exit status 2) naming the path and saying what is expected; so is a full
disk or read-only destination while writing, after which the temporary folder is gone and `--out` is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import ArgumentParser, UserError, run_cli
from .fileio import check_replaceable_dir, file_sha256, read_written_record, some_entries, write_errors
from .prune_vocabulary import prune_folder
from .vocabulary import VOCABULARY_FILE, Vocabulary

RUN_CONFIG = "run_config.json"  # the training config train_ldm.py writes: it travels with the model
# files of ours at the model folder's root that travel with it besides the pipeline: the training config, the
# training captions' words (ldm_app.vocabulary; generate.py names the prompt words the model never saw) and, for a
# distilled model, its teacher's training config (ldm_app.training.distill.TEACHER_FILES)
CARRIED_FILES = (RUN_CONFIG, VOCABULARY_FILE, "teacher_run_config.json")
STORE_DTYPES = ("fp16", "fp32")
EXPORT_RECORD = "ldm_app_export.json"  # written last into every export: what it wrote (see the module docstring)
WRITTEN_BY = "python -m ldm_app.export"
_EXPECTED = "a new path, an empty folder, or a folder written by an earlier export"


def _tree(folder: Path) -> dict[str, os.stat_result]:
    """Every entry under `folder` (files, folders, links; links not followed) by relative POSIX path."""
    entries = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root, name)
            entries[path.relative_to(folder).as_posix()] = path.lstat()
    return entries


def write_export_record(folder: Path, dtype: str) -> None:
    """List every file under `folder` (size, SHA-256) in `folder/ldm_app_export.json`."""
    files = {}
    for rel, st in sorted(_tree(folder).items()):
        if os.path.islink(folder / rel) or not (folder / rel).is_file():
            continue
        files[rel] = {"bytes": st.st_size, "sha256": file_sha256(folder / rel)}
    record = {"written_by": WRITTEN_BY, "dtype": dtype, "files": files}
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _not_an_export(out: Path, why: str) -> UserError:
    return UserError(f"--out {out} {why}; refusing to replace it: expected {_EXPECTED}")


def check_previous_export(out: Path) -> None:
    """Return if the folder `out` is exactly what an earlier export wrote (see the module docstring), else raise
    a UserError naming the first thing that is not."""
    record_path = out / EXPORT_RECORD
    if record_path.is_symlink() or not record_path.is_file():
        raise _not_an_export(
            out, f"is a folder not written by this export (no {EXPORT_RECORD}; it holds {some_entries(out)})"
        )
    files = read_written_record(record_path, WRITTEN_BY)
    if files is None:
        raise _not_an_export(out, f"has an unreadable {EXPORT_RECORD}")
    expected_dirs = {parent.as_posix() for rel in files for parent in Path(rel).parents if parent != Path(".")}
    for rel, st in sorted(_tree(out).items()):
        path = out / rel
        if rel == EXPORT_RECORD:
            continue
        if path.is_symlink():
            raise _not_an_export(out, f"holds a symbolic link {rel} that no export writes")
        if path.is_dir():
            if rel not in expected_dirs:
                raise _not_an_export(out, f"holds {rel}/, which the earlier export did not write")
            continue
        if rel not in files:
            raise _not_an_export(out, f"holds {rel}, which the earlier export did not write")
        if st.st_size != files[rel]["bytes"] or file_sha256(path) != files[rel]["sha256"]:
            raise _not_an_export(out, f"holds {rel}, changed since the earlier export wrote it")


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(model: Path, out: Path) -> None:
    """Everything about `--out` that can be checked before the model is loaded: not the model nor related to it
    by nesting, not a link or a file, empty or an earlier export, and its folder writable."""
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {out} has no folder name of its own: give a path like DIR/my_export")
    if out.suffix.lower() in (".safetensors", ".ckpt"):  # a folder by that name would be no single file
        raise UserError(f"--out {out} names a {out.suffix} file, but the export is a folder: add --single_file for "
                        "one file, or give a folder name")  # fmt: skip
    if not (model / "model_index.json").is_file() and model.is_dir():
        raise UserError(f"--model {model} is not a model folder (no model_index.json): give a pipeline folder, "
                        "e.g. train_ldm.py's output or ldm_app/assets/default_model")  # fmt: skip
    real_model, real_out = model.resolve(), out.resolve()
    if real_out == real_model:
        raise UserError(f"--out {out} is the model folder {model} itself: --out must differ from --model")
    if _inside(real_out, real_model):
        raise UserError(f"--out {out} is inside the model folder {model}: give a folder outside it")
    if _inside(real_model, real_out):
        raise UserError(
            f"--out {out} contains the model folder {model}: exporting there would delete the model; "
            "give a folder outside it"
        )
    check_replaceable_dir(out, _EXPECTED, check_previous_export)  # built next to --out, renamed into place


def check_single_file_out(model: Path, out: Path) -> None:
    """--out for --single_file (see the module docstring), checked before the model is loaded."""
    if out.suffix.lower() != ".safetensors" or out.name.lower() == ".safetensors":
        raise UserError(f"--out {out}: with --single_file, --out is a file path ending .safetensors")
    if out.is_symlink() or out.exists():
        kind = "a symbolic link" if out.is_symlink() else "a folder" if out.is_dir() else "an existing file"
        raise UserError(f"--out {out} is {kind}; refusing to replace it: with --single_file, give a new file path")
    if _inside(out.resolve(), model.resolve()):
        raise UserError(f"--out {out} is inside the model folder {model}: give a path outside it")
    existing = out.parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder: give a path in a folder")
    with write_errors(out):  # a read-only or forbidden place: found now, before any slow work
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)


def _export_single_file(model: Path, out: Path, dtype: str) -> Path:
    check_single_file_out(model, out)  # before torch is even imported

    from .pipeline import DTYPES, LatentDiffusionPipeline
    from .single_file import save_single_file

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    check_single_file_out(model, out)  # again: --out may have appeared while the model was loading
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    return save_single_file(pipe, out, dtype=DTYPES[dtype])  # atomic: a temporary file renamed into place


def export_model(model: str | Path, out: str | Path, dtype: str = "fp16", single_file: bool = False,
                 prune_vocabulary: bool = False) -> Path:  # fmt: skip
    if dtype not in STORE_DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}")
    model, out = Path(model), Path(out)
    if single_file and prune_vocabulary:
        raise UserError("--prune_vocabulary cannot go with --single_file: the single-file layout holds SD-1.x's "
                        "whole CLIP vocabulary; export a folder to prune")  # fmt: skip
    if single_file:
        return _export_single_file(model, out, dtype)
    vocab = None
    if prune_vocabulary:
        vocab = Vocabulary.read(model)
        if vocab is None or not vocab.words:
            raise UserError(f"--prune_vocabulary needs the model's training words ({model / VOCABULARY_FILE}, "
                            "written by train_ldm.py or `python -m ldm_app.vocabulary`); it has none")  # fmt: skip
    check_out(model, out)  # before torch is even imported: a wrong --out costs nothing

    from .fileio import atomic_dir
    from .pipeline import DTYPES, LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model)  # float32, sampling defaults included
    pipe.to(DTYPES[dtype])  # not resolve_device_dtype: storing fp16 from the CPU is fine, running it is not
    with atomic_dir(out) as tmp:  # a full disk or read-only place: one UserError (fileio.write_errors)
        pipe.save_pretrained(tmp)
        for name in CARRIED_FILES:
            if (model / name).is_file():
                shutil.copy2(model / name, tmp / name)
        if vocab is not None:
            report = prune_folder(tmp, vocab)
            print(f"pruned the vocabulary to {len(vocab)} words: {report.tokens_before} -> {report.tokens_after} "
                  f"tokens, {report.merges_before} -> {report.merges_after} BPE merges")
        write_export_record(tmp, dtype)
        check_out(model, out)  # again just before the swap: --out may have changed while the export was written
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m ldm_app.export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a pipeline folder (e.g. a train_ldm.py output folder)")
    p.add_argument("--out", required=True, help="a new or empty folder, or an earlier export (replaced atomically)")
    p.add_argument("--dtype", choices=STORE_DTYPES, default="fp16", help="precision of the stored weights")
    p.add_argument("--single_file", action="store_true",
                   help="write one SD-1.x single-file checkpoint (CompVis/A1111 layout); --out: a new .safetensors")
    p.add_argument("--prune_vocabulary", action="store_true",
                   help="keep only the tokens of the model's training words (vocabulary.json) in its tokenizer and "
                        "text encoder: same images for those words, faster loading, smaller folder")
    args = p.parse_args(argv)
    out = export_model(args.model, args.out, args.dtype, single_file=args.single_file,
                       prune_vocabulary=args.prune_vocabulary)
    size = out.stat().st_size if args.single_file else folder_bytes(out)
    print(f"exported {args.model} -> {out} ({size / 2**20:.1f} MiB, {args.dtype} weights"
          + (", single file: U-Net, VAE and text encoder only)" if args.single_file else ")"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
