"""`python -m ldm_app.export` and `python -m ldm_app.data.shapes` never delete or replace what they did not write.

Each refusal must be one `error: ...` line (exit status 2) and leave the file system byte for byte as it was: the
tests snapshot every entry (files with their bytes, folders, links with their targets) before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_app import limits
from ldm_app.data import shapes
from ldm_app.errors import run_cli
from ldm_app.export import EXPORT_RECORD, RUN_CONFIG, check_previous_export, export_model
from ldm_app.export import main as export_main

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root` (links not followed): a file's bytes, a link's target, "<dir>" for a folder."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "<dir>"
            else:
                found[rel] = path.read_bytes()
    return found


def one_line_error(main, argv, capsys, only_line: bool = True) -> str:
    """Run `main(argv)` as the CLI does; it must end with exit status 2 and one `error:` line, the only line on
    stderr (`only_line`), or else (a failure while writing) the last, after progress bars and library notices."""
    capsys.readouterr()
    assert run_cli(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    if only_line:
        assert len(lines) == 1, err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def subprocess_one_line_error(module: str, argv: list) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# ---- export -------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals must come before the model is loaded: loading it is a test failure."""
    from ldm_app.pipeline import LatentDiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", refuse)


@pytest.fixture
def run_dir(tiny_pipeline_dir, tmp_path) -> Path:
    """A training run folder: the pipeline, a checkpoint holding a pipeline, logs and the run config."""
    run = tmp_path / "R"
    shutil.copytree(tiny_pipeline_dir, run)
    shutil.copytree(tiny_pipeline_dir, run / "checkpoint-6")
    (run / "logs").mkdir()
    (run / "logs" / "events.txt").write_text("step 6 loss 0.1\n")
    (run / RUN_CONFIG).write_text('{"train": {}}\n')
    return run


@pytest.fixture(scope="module")
def previous_export(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """One real export (into an existing empty folder, which is allowed); read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("export") / "previous"
    out.mkdir()
    assert export_model(tiny_pipeline_dir, out, "fp16") == out
    return out


@pytest.mark.parametrize(
    "model, out, message",
    [
        ("R/checkpoint-6", "R", "--out {tmp}/R contains the model folder {tmp}/R/checkpoint-6"),
        ("R", "R", "--out {tmp}/R is the model folder {tmp}/R itself"),
        ("R", "R/export", "--out {tmp}/R/export is inside the model folder {tmp}/R"),
        ("R", "link_to_R", "--out {tmp}/link_to_R is the model folder {tmp}/R itself"),
        ("link_to_R/checkpoint-6", "R", "--out {tmp}/R contains the model folder {tmp}/link_to_R/checkpoint-6"),
        ("R/checkpoint-6", "link_to_R", "--out {tmp}/link_to_R contains the model folder"),
        ("R", "mine.safetensors", "--out {tmp}/mine.safetensors names a .safetensors file, but the export is a folder"),
        ("notes", "exported", "--model {tmp}/notes is not a model folder (no model_index.json)"),
    ],
)
def test_export_never_writes_over_its_own_source(run_dir, tmp_path, no_model_load, capsys, model, out, message):
    (tmp_path / "link_to_R").symlink_to(run_dir)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a model")
    before = snapshot(tmp_path)
    line = one_line_error(export_main, ["--model", tmp_path / model, "--out", tmp_path / out], capsys)
    assert line.startswith("error: " + message.format(tmp=tmp_path)), line
    assert snapshot(tmp_path) == before


def _prepare_out(kind: str, tmp_path: Path, previous_export: Path, tiny_pipeline_dir: Path) -> Path:
    out = tmp_path / "out"
    if kind == "user_folder":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    elif kind == "file":
        out.write_text("a file")
    elif kind == "under_file":
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "x"
    elif kind == "model_not_exported":  # a model folder (or an export older than the record): not ours
        shutil.copytree(tiny_pipeline_dir, out)
    else:
        shutil.copytree(previous_export, out)
        if kind == "export_plus_checkpoint":
            (out / "checkpoint-3").mkdir()
            (out / "checkpoint-3" / "state.bin").write_bytes(b"\0" * 10)
        elif kind == "export_plus_file":
            (out / "unet" / "notes.txt").write_text("mine")
        elif kind == "export_edited":
            (out / "model_index.json").write_text((out / "model_index.json").read_text() + " ")
        elif kind == "export_bad_record":
            (out / EXPORT_RECORD).write_text("{not json")
        elif kind == "export_plus_link":
            (out / "elsewhere").symlink_to(tmp_path)
        elif kind == "link_to_export":
            out.rename(tmp_path / "real_export")
            out.symlink_to(tmp_path / "real_export")
    return out


@pytest.mark.parametrize(
    "kind, message",
    [
        ("user_folder", "is a folder not written by this export (no ldm_app_export.json; it holds notes.txt)"),
        ("file", "is a file, not a folder"),
        ("under_file", "{tmp}/file is a file, not a folder"),
        ("model_not_exported", "is a folder not written by this export (no ldm_app_export.json"),
        ("export_plus_checkpoint", "holds checkpoint-3/, which the earlier export did not write"),
        ("export_plus_file", "holds unet/notes.txt, which the earlier export did not write"),
        ("export_edited", "holds model_index.json, changed since the earlier export wrote it"),
        ("export_bad_record", "has an unreadable ldm_app_export.json"),
        ("export_plus_link", "holds a symbolic link elsewhere"),
        ("link_to_export", "is a symbolic link"),
    ],
)
def test_export_refuses_an_out_holding_anything_but_an_export(
    tiny_pipeline_dir, previous_export, tmp_path, no_model_load, capsys, kind, message
):
    out = _prepare_out(kind, tmp_path, previous_export, tiny_pipeline_dir)
    before = snapshot(tmp_path)
    line = one_line_error(export_main, ["--model", tiny_pipeline_dir, "--out", out], capsys)
    assert line.startswith(f"error: --out {out}") and message.format(tmp=tmp_path) in line, line
    assert snapshot(tmp_path) == before


def test_export_replaces_exactly_a_previous_export(tiny_pipeline_dir, previous_export, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(previous_export, out)
    check_previous_export(out)  # the copy is recognised
    assert run_cli(export_main, ["--model", str(tiny_pipeline_dir), "--out", str(out), "--dtype", "fp32"]) == 0
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["dtype"] == "fp32"
    # The record lists exactly the files written, and the new export is again recognised as one.
    written = {k for k, v in snapshot(out).items() if v != "<dir>"} - {EXPORT_RECORD}
    assert set(record["files"]) == written and "model_index.json" in written
    check_previous_export(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folders left


@pytest.mark.parametrize("where", ["inside", "mount_point", "deeper"])
def test_export_read_only_out_is_one_line_before_loading(tiny_pipeline_dir, readonly_dir, no_model_load, capsys,
                                                         where):
    out = {"inside": readonly_dir / "out", "mount_point": readonly_dir, "deeper": readonly_dir / "a" / "b"}[where]
    line = one_line_error(export_main, ["--model", tiny_pipeline_dir, "--out", out], capsys)
    expected = "is a mount point" if where == "mount_point" else "Read-only file system"
    assert line.startswith(f"error: --out {out}" if where == "mount_point" else f"error: cannot write {out}")
    assert expected in line, line
    assert snapshot(readonly_dir) == {}


def test_export_full_disk_is_one_line_and_leaves_nothing(tiny_pipeline_dir, small_disk, capsys):
    (small_disk / "keep.txt").write_text("the user's file")
    before = snapshot(small_disk)
    out = small_disk / "model"  # the tiny pipeline is over 2 MiB, even in fp16
    line = one_line_error(export_main, ["--model", tiny_pipeline_dir, "--out", out], capsys, only_line=False)
    assert line == f"error: cannot write {out}: No space left on device", line
    assert snapshot(small_disk) == before  # no temporary folder left behind


def test_export_subprocess_refuses_to_delete_the_training_run(run_dir, tmp_path):
    before = snapshot(tmp_path)
    line = subprocess_one_line_error("ldm_app.export", ["--model", run_dir / "checkpoint-6", "--out", run_dir])
    assert f"--out {run_dir} contains the model folder" in line
    assert snapshot(tmp_path) == before


# ---- shapes -------------------------------------------------------------------------------------------------


def _shapes_argv(out, *extra) -> list:
    return ["--out", out, "--num_images", "3", "--resolution", "16", *extra]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A shapes output (3 images); read-only: copy it to change it."""
    return shapes.make_dataset(tmp_path_factory.mktemp("shapes") / "generated", 3, 16, seed=0)


def _prepare_data_out(kind: str, tmp_path: Path, generated: Path) -> Path:
    out = tmp_path / "data"
    if kind == "user_folder":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    elif kind == "file":
        out.write_text("a file")
    elif kind == "under_file":
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "x"
    else:
        shutil.copytree(generated, out)
        if kind == "real_dataset_plus_file":  # a dataset this generator did not write (no manifest), as observed
            (out / shapes.MANIFEST_FILE).unlink()
            (out / "README.txt").write_text("where these images came from")
        elif kind == "output_plus_file":
            (out / "notes.txt").write_text("mine")
        elif kind == "output_plus_folder":
            (out / "extra").mkdir()
        elif kind == "output_edited":
            (out / "metadata.jsonl").write_text((out / "metadata.jsonl").read_text().replace("a ", "one ", 1))
        elif kind == "output_bad_manifest":
            (out / shapes.MANIFEST_FILE).write_text('{"files": 3}')
        elif kind == "link_to_output":
            out.rename(tmp_path / "real_data")
            out.symlink_to(tmp_path / "real_data")
    return out


@pytest.mark.parametrize(
    "kind, message",
    [
        ("user_folder", "is a folder not written by this generator (no shapes_manifest.json; it holds notes.txt)"),
        ("real_dataset_plus_file", "is a folder not written by this generator (no shapes_manifest.json; it holds "
                                   "000000.png, 000001.png, 000002.png and 2 more)"),
        ("file", "is a file, not a folder"),
        ("under_file", "{tmp}/file is a file, not a folder"),
        ("output_plus_file", "holds notes.txt, which the generator did not write"),
        ("output_plus_folder", "holds extra, which the generator did not write"),
        ("output_edited", "holds metadata.jsonl, changed since the generator wrote it"),
        ("output_bad_manifest", "has an unreadable shapes_manifest.json"),
        ("link_to_output", "is a symbolic link"),
    ],
)
def test_shapes_refuses_a_folder_it_did_not_write(generated, tmp_path, capsys, monkeypatch, kind, message):
    monkeypatch.setattr(shapes, "render_scene", lambda *a: pytest.fail("drew before checking --out"))
    out = _prepare_data_out(kind, tmp_path, generated)
    before = snapshot(tmp_path)
    line = one_line_error(shapes.main, _shapes_argv(out), capsys)
    assert line.startswith(f"error: --out {out}") and message.format(tmp=tmp_path) in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("start", ["missing", "empty", "previous_output"])
def test_shapes_writes_a_new_empty_or_own_folder(generated, tmp_path, start):
    out = tmp_path / "data"
    if start == "empty":
        out.mkdir()
    elif start == "previous_output":
        shutil.copytree(generated, out)
    assert run_cli(shapes.main, ["--out", str(out), "--num_images", "2", "--resolution", "16", "--seed", "5"]) == 0
    manifest = json.loads((out / shapes.MANIFEST_FILE).read_text())
    assert manifest["arguments"] == {"num_images": 2, "resolution": 16, "seed": 5, "two_object_fraction": 0.25,
                                     "labels": False}
    assert sorted(manifest["files"]) == ["000000.png", "000001.png", "metadata.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["files"]) + [shapes.MANIFEST_FILE]
    shapes.check_previous_output(out)  # and it is recognised as ours next time
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary or old folders left


def test_shapes_resolution_above_the_limit_is_refused_before_drawing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shapes, "render_scene", lambda *a: pytest.fail("drew an image above the limit"))
    line = one_line_error(shapes.main, ["--out", tmp_path / "d", "--num_images", "1", "--resolution", "100000"],
                          capsys)
    assert line.startswith(f"error: --resolution is 100000 pixels, above the limit of "
                           f"{limits.current().max_image_side} (max_image_side"), line
    try:
        limits.configure(max_image_side=32)
        line = one_line_error(shapes.main, ["--out", tmp_path / "d", "--num_images", "1", "--resolution", "33"],
                              capsys)
        assert "--resolution is 33 pixels, above the limit of 32" in line
    finally:
        limits.reset()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "mount_point", "deeper"])
def test_shapes_read_only_out_is_one_line(readonly_dir, capsys, where):
    out = {"inside": readonly_dir / "d", "mount_point": readonly_dir, "deeper": readonly_dir / "a" / "b"}[where]
    line = one_line_error(shapes.main, _shapes_argv(out), capsys)
    if where == "mount_point":
        assert line.startswith(f"error: --out {out} is a mount point"), line
    else:
        assert line == f"error: cannot write {out}: Read-only file system", line


def test_shapes_full_disk_keeps_the_previous_output(small_disk, capsys):
    out = shapes.make_dataset(small_disk / "data", 3, 16, seed=0)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler.bin").write_bytes(b"\1" * (free - 32 * 1024))  # leave 8 tmpfs pages
    before = snapshot(small_disk)
    argv = ["--out", out, "--num_images", "40", "--resolution", "32"]
    line = one_line_error(shapes.main, argv, capsys, only_line=False)
    assert line == f"error: cannot write {out}: No space left on device", line
    assert snapshot(small_disk) == before  # previous output intact, no temporary folder left


def test_shapes_subprocess_refuses_a_real_dataset_with_other_files(generated, tmp_path):
    out = _prepare_data_out("real_dataset_plus_file", tmp_path, generated)
    before = snapshot(tmp_path)
    line = subprocess_one_line_error("ldm_app.data.shapes", _shapes_argv(out))
    assert line.startswith(f"error: --out {out} is a folder not written by this generator")
    line = subprocess_one_line_error("ldm_app.data.shapes", _shapes_argv(tmp_path / "new", "--resolution", "100000"))
    assert "above the limit of" in line
    assert snapshot(tmp_path) == before
