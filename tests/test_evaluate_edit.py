"""`python -m ldm_app.evaluate edit`: the pixel check on hand-made images, the report's fields on the tiny pipeline,
paste_back exactly 0 outside the mask, one-line errors."""

from __future__ import annotations

import json
import numpy as np
import pytest

from ldm_app.data.shapes import COLOURS
from ldm_app.evaluation import edit


def _square(colour: str, background=(255, 255, 255)) -> np.ndarray:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = background
    image[20:40, 20:40] = COLOURS[colour]
    return image


def test_pixel_check_on_hand_made_images():
    region = np.zeros((64, 64), dtype=bool)
    region[22:38, 22:38] = True
    red, blue = _square("red"), _square("blue")
    recoloured = [edit.colour_right(blue, region, "blue", "white")]
    unchanged = [edit.colour_right(red, region, "blue", "white")]
    assert np.mean(recoloured) == 1.0 and np.mean(unchanged) == 0.0
    assert edit.region_colour(red, region, "white") == "red"
    erased = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert edit.region_colour(erased, region, "white") == edit.NOTHING
    # float [0, 1] images (the pipeline's "np" output) read the same as uint8
    assert edit.colour_right(blue.astype(np.float32) / 255, region, "blue", "white")
    # foreground IoU: the same square 1.0, moved by half its side 1/3, gone 0
    fg = edit.foreground(red, "white")
    assert fg.sum() == 400 and edit.iou(fg, edit.foreground(blue, "white")) == 1.0
    moved = np.roll(red, 10, axis=1)
    assert edit.iou(fg, edit.foreground(moved, "white")) == pytest.approx(1 / 3)
    assert edit.iou(fg, edit.foreground(erased, "white")) == 0.0
    outside = ~region
    assert edit.abs_diff(red, red, outside) == {"max": 0.0, "mean": 0.0}
    assert edit.abs_diff(red, blue, outside)["max"] == 180.0  # the square's rim lies outside the region


def test_examples_are_fresh_and_masks_spare_the_other_object():
    examples = edit.inpaint_examples(20, seed=1)
    assert [e.source for e in examples] == [e.source for e in edit.inpaint_examples(20, seed=1)]
    for ex in examples:
        new, old = ex.target.objects[ex.index], ex.source.objects[ex.index]
        other = ex.source.objects[1 - ex.index]
        assert new.colour not in (old.colour, other.colour) and new.shape != old.shape
        assert ex.mask.any() and not (ex.mask & (edit.object_coverage(other, 64) > 0)).any()
        assert (ex.mask >= (edit.object_coverage(old, 64) > 0)).all()  # the whole old object is masked
    recolour = edit.recolour_examples(10, seed=1)
    assert all(r.source.objects[0].colour != r.target.objects[0].colour for r in recolour)
    assert recolour[0].source != edit.recolour_examples(1, seed=2)[0].source


def test_run_edit_report_and_paste_back_exact(tiny_pipeline, tiny_judge):
    result = edit.run_edit(tiny_pipeline, tiny_judge, num=2, batch_size=2, strengths=(0.5,),
                           settings=(("blend", False, {}), ("blend", True, {})), log=lambda _: None)  # fmt: skip
    report = result.report
    json.dumps(report)  # serialisable
    assert set(report) >= {"settings", "recolour", "inpaint", "judge", "per_example"}
    r = report["recolour"]["strength 0.5"]
    assert set(r["judge"]) >= {"colour_right", "position_kept", "size_kept", "kept"}
    assert set(r["pixels"]) == {"colour_right", "kept_iou_ge_0.5", "mean_iou"} and r["seconds_per_image"] > 0
    source = report["recolour"]["source (no edit)"]
    assert source["pixels"]["colour_right"] == 0.0 and source["pixels"]["mean_iou"] == 1.0
    pasted = report["inpaint"]["blend+paste_back"]
    assert set(pasted["judge"]) >= {"new_right", "new_colour_right", "new_shape_right", "other_kept", "meets_target"}
    assert pasted["pixels"]["outside_mask_max_abs_diff"] == 0.0  # exactly the input outside the mask
    assert pasted["inside_mask_max_abs_diff_vs_without_paste_back"] <= 1.0  # same seeds: same inside
    assert report["inpaint"]["blend"]["pixels"]["outside_mask_max_abs_diff"] > 0  # a random model changes it
    assert "autoencoder round trip (no edit)" in report["inpaint"]
    lines = edit.table_lines(report)
    assert any(line.startswith("blend+paste_back") for line in lines)


def test_grid(tiny_pipeline, tiny_judge, tmp_path):
    from PIL import Image

    result = edit.run_edit(tiny_pipeline, tiny_judge, num=1, batch_size=1, strengths=(0.5, 0.9),
                           settings=(("repaint", True, {}),), log=lambda _: None)  # fmt: skip
    edit.save_grid(result, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width >= 4 * 128 and grid.height > 2 * 128


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from ldm_app.errors import run_cli
    from ldm_app.evaluate import main

    capsys.readouterr()
    code = run_cli(main, ["edit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(done: tuple[int, str, str], *words: str) -> None:
    code, _, err = done
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_input_is_one_line(tmp_path, tiny_pipeline_dir, capsys):
    model = str(tiny_pipeline_dir)
    _one_line_error(_cli(capsys, "--model", str(tmp_path / "missing")), "missing")
    _one_line_error(_cli(capsys, "--model", model, "--num", "0"), "--num")
    _one_line_error(_cli(capsys, "--model", model, "--num", "x"), "--num")
    (tmp_path / "folder").mkdir()
    _one_line_error(_cli(capsys, "--model", model, "--json", str(tmp_path / "folder")), "--json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(_cli(capsys, "--model", model, "--json", str(blocker / "out.json")), "out.json")
    _one_line_error(_cli(capsys, "--model", model, "--grid", str(blocker / "sub" / "g.png")), "is a file")


def test_cli_writes_json(tmp_path, tiny_pipeline_dir, tiny_judge_cache, capsys):
    out = tmp_path / "edit.json"
    code, stdout, err = _cli(capsys, "--model", str(tiny_pipeline_dir), "--num", "1", "--json", str(out),
                             "--judge_cache", str(tiny_judge_cache), "--judge_threshold", "0")  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["settings"]["num"] == 1 and set(report["inpaint"]) >= {"blend", "repaint+paste_back"}
    assert report["inpaint"]["repaint+paste_back"]["pixels"]["outside_mask_max_abs_diff"] == 0.0
    assert "blend+paste_back" in stdout

