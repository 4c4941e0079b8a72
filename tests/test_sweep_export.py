"""Settings sweep (defaults chosen by measurement) and the fp16 export of a model folder, on tiny random models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from ldm_app.errors import UserError
from ldm_app.evaluate import main as evaluate_main
from ldm_app.evaluation.sweep import (
    SWEEP_FILE,
    Setting,
    adherence_score,
    choose,
    judge_score,
    sweep_row,
    markdown_table,
    parse_setting,
)
from ldm_app.export import RUN_CONFIG, export_model, folder_bytes
from ldm_app.pipeline import (
    DEFAULTS_FILE,
    LatentDiffusionPipeline,
    read_sampling_defaults,
    write_sampling_defaults,
)


def _report(colour, shape, size, position, relation, geometry=None):
    report = {
        "one_object": {"accuracy": {"colour": colour, "shape": shape, "size": size, "position": position,
                                    "background": 1.0}},
        "two_object": {"relation_accuracy": relation},
    }
    if geometry is not None:  # the geometric measure's figures, as adherence.py writes them
        g_colour, g_shape, g_size, g_position, g_relation = geometry
        report["one_object"]["accuracy_geometry"] = {"colour": g_colour, "shape": g_shape, "size": g_size,
                                                     "position": g_position, "background": 1.0}
        report["two_object"]["relation_accuracy_geometry"] = g_relation
    return report


def test_score_is_mean_of_targeted_accuracies():
    assert adherence_score(_report(1.0, 0.5, 1.0, 0.5, 0.0)) == pytest.approx(0.6)
    assert adherence_score(_report(1.0, 0.5, 1.0, 0.5, None)) == pytest.approx(0.75)  # no two-object prompts


def test_score_is_the_harsher_judges():
    # the CNN judge at 0.98 but the geometric measure finding distorted shapes: the setting scores 0.8
    lenient = _report(1.0, 1.0, 1.0, 1.0, 0.9, geometry=(1.0, 0.6, 1.0, 1.0, 0.4))
    assert judge_score(lenient) == pytest.approx(0.98)
    assert judge_score(lenient, geometric=True) == pytest.approx(0.8)
    assert adherence_score(lenient) == pytest.approx(0.8)
    # and the other way round: a judge cannot be outvoted by the other one
    harsh_cnn = _report(0.5, 1.0, 1.0, 1.0, 1.0, geometry=(1.0, 1.0, 1.0, 1.0, 1.0))
    assert adherence_score(harsh_cnn) == pytest.approx(0.9)
    # so a sweep picks the setting both judges accept over the one only the CNN judge likes
    rows = [
        sweep_row(Setting("dpm++", 20, 3.0), {**lenient, "kid": _KID, "seconds_per_image": 0.1}, True),
        sweep_row(Setting("dpm++", 20, 1.5), {**_report(1.0, 0.95, 1.0, 1.0, 0.9, geometry=(1.0, 0.95, 1.0, 1.0,
                                                                                             0.8)),
                                              "kid": _KID, "seconds_per_image": 0.1}, True),
    ]
    assert choose(rows)["setting"] == "dpm++-20-g1.5"
    assert rows[0]["shape_geometry"] == 0.6 and rows[0]["relation_geometry"] == 0.4
    table = markdown_table(rows, rows[1])
    assert "| dpm++ | 20 | 3 | 100% / 100% | 100% / 60% | 100% / 100% | 100% / 100% | 90% / 40% | 0.800 |" in table


_KID = {"generated_vs_real": {"mean": 0.05}}


def test_choose_best_candidate_first_on_ties():
    rows = [
        {"setting": "a", "candidate": True, "score": 0.5},
        {"setting": "b", "candidate": True, "score": 0.7},
        {"setting": "c", "candidate": True, "score": 0.7},
        {"setting": "d", "candidate": False, "score": 0.9},  # measured, never chosen
    ]
    assert choose(rows)["setting"] == "b"
    with pytest.raises(UserError, match="no candidate"):
        choose([rows[3]])


def test_choose_with_a_tolerance_takes_the_fewest_unet_passes_close_to_the_best():
    def row(name, steps, guidance, score):
        return {"setting": name, "candidate": True, "steps": steps, "guidance_scale": guidance, "score": score}

    rows = [row("8 steps", 8, 1.0, 0.956), row("4-step grid", 4, 1.0, 0.954), row("3 steps", 3, 1.0, 0.930),
            row("2 steps at guidance 2", 2, 2.0, 0.955)]  # 4 passes too, but the higher score
    assert choose(rows)["setting"] == "8 steps"
    assert choose(rows, 0.01)["setting"] == "2 steps at guidance 2"
    assert choose(rows[:3], 0.01)["setting"] == "4-step grid"
    assert choose(rows[:3], 0.001)["setting"] == "8 steps"
    assert choose(rows[:3], 0.05)["setting"] == "3 steps"


@pytest.mark.parametrize("text", ["ddim:50", "ddim:x:7.5", "nope:50:7.5", "ddim:0:7.5", "ddim:50:-1",
                                  "dpm++:999/999:1", "dpm++:500/999:1", "dpm++:999/x:1", "dpm++:999/-5:1"])
def test_parse_setting_errors(text):
    with pytest.raises(UserError, match="--setting"):
        parse_setting(text)


def test_parse_setting_and_name():
    assert parse_setting("ddpm:1000:7.5") == Setting("ddpm", 1000, 7.5)
    assert Setting("dpm++", 20, 3.0).name == "dpm++-20-g3"
    grid = parse_setting("dpm++:999/600/300/80:1")  # a timestep grid in place of the step count
    assert grid == Setting("dpm++", 4, 1.0, (999, 600, 300, 80)) and grid.name == "dpm++-4-g1-t999.600.300.80"


def test_sweep_cli_measures_every_setting_and_writes_chosen_defaults(tiny_pipeline_dir, tiny_judge_cache,
                                                                      tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    out = tmp_path / "sweep"
    evaluate_main([
        "sweep", "--model", str(model), "--sampler", "ddim", "--steps", "2", "--guidance_scales", "1", "3",
        "--setting", "euler:3:7.5", "--setting", "euler:900/400/50:1", "--num_prompts", "3", "--two_object_prompts", "1", "--batch_size", "4",
        "--judge_cache", str(tiny_judge_cache), "--judge_threshold", "0", "--device", "cpu", "--out", str(out),
        "--write_defaults",
    ])
    result = json.loads((out / SWEEP_FILE).read_text())
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["ddim-2-g1", "ddim-2-g3", "euler-3-g7.5", "euler-3-g1-t900.400.50"]
    assert [r["candidate"] for r in rows] == [True, True, False, False]
    for r in rows:
        report = json.loads((out / r["setting"] / "adherence.json").read_text())
        assert report["settings"]["sampler"] == r["sampler"] and report["settings"]["steps"] == r["steps"]
        assert report["settings"]["timesteps"] == r["timesteps"]
        assert r["score"] == pytest.approx(adherence_score(report))
    assert rows[-1]["timesteps"] == [900, 400, 50] and rows[0]["timesteps"] is None
    chosen = choose(rows)
    assert result["chosen"] == chosen["setting"]
    defaults = read_sampling_defaults(model)
    size = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir).resolve_defaults(None, None, None, None)[0]
    assert defaults == {"sampler": "ddim", "num_inference_steps": 2, "guidance_scale": chosen["guidance_scale"],
                        "height": size, "width": size}
    printed = capsys.readouterr().out
    assert "| sampler | steps |" in printed and "(default)" in printed and "| 3 (900/400/50) |" in printed
    # the pipeline now uses them when the caller gives none
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    assert pipe.resolve_defaults(None, None, None, None)[2:] == (2, chosen["guidance_scale"])


def test_sweep_writes_a_chosen_timestep_grid_as_the_models_defaults(tiny_pipeline_dir, tiny_judge_cache, tmp_path,
                                                                    capsys):
    """A grid candidate chosen by --tolerance (fewer passes, score within the tolerance) lands in ldm_app.json with its
    grid, and the model then samples on it; the tolerance is recorded."""
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    before = {"sampler": "euler", "num_inference_steps": 5, "guidance_scale": 2.0}
    write_sampling_defaults(model, before)
    out = tmp_path / "sweep"
    evaluate_main([
        "sweep", "--model", str(model), "--sampler", "dpm++", "--steps", "6", "--guidance_scales", "1",
        "--candidate", "dpm++:900/400/50:1", "--tolerance", "0.99", "--num_prompts", "3", "--two_object_prompts",
        "1", "--batch_size", "4", "--judge_cache", str(tiny_judge_cache), "--judge_threshold", "0", "--device",
        "cpu", "--out", str(out), "--write_defaults",
    ])  # fmt: skip
    result = json.loads((out / SWEEP_FILE).read_text())
    assert [r["candidate"] for r in result["rows"]] == [True, True]
    assert result["chosen"] == "dpm++-3-g1-t900.400.50" and result["tolerance"] == 0.99
    assert result["previous_defaults"] == before  # what --write_defaults replaced, kept to undo it
    defaults = read_sampling_defaults(model)
    assert defaults["num_inference_steps"] == 3 and defaults["timesteps"] == [900, 400, 50]
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    assert pipe.stored_timesteps(pipe.scheduler, None, 3) == [900, 400, 50]

    # a later sweep into the same --out keeps the earlier reports and names those it did not measure
    evaluate_main(["sweep", "--model", str(model), "--sampler", "dpm++", "--steps", "6", "--guidance_scales", "2",
                   "--num_prompts", "3", "--two_object_prompts", "1", "--batch_size", "4", "--judge_cache",
                   str(tiny_judge_cache), "--judge_threshold", "0", "--device", "cpu", "--out", str(out)])
    again = json.loads((out / SWEEP_FILE).read_text())
    assert [r["setting"] for r in again["rows"]] == ["dpm++-6-g2"]
    assert again["other_reports"] == ["dpm++-3-g1-t900.400.50", "dpm++-6-g1"]
    assert all((out / name / "adherence.json").is_file() for name in again["other_reports"])
    assert "also holds the reports of 2 setting(s) this sweep did not measure" in capsys.readouterr().out


def test_sweep_refuses_bad_input_before_work(tmp_path):
    with pytest.raises(UserError, match="not found"):
        evaluate_main(["sweep", "--model", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="--setting"):
        evaluate_main(["sweep", "--model", str(tmp_path), "--setting", "ddim:fifty:7.5"])
    with pytest.raises(UserError, match="--tolerance must be in"):
        evaluate_main(["sweep", "--model", str(tmp_path), "--tolerance", "nan"])
    with pytest.raises(UserError, match="guidance >= 0, got 20 steps and guidance -1"):
        evaluate_main(["sweep", "--model", str(tmp_path), "--guidance_scales", "3", "-1"])


def test_an_out_that_is_a_file_is_refused_before_any_sampling(tiny_pipeline_dir, tmp_path):
    (tmp_path / "taken.png").write_bytes(b"mine")
    for command in (["sweep", "--guidance_scales", "2"], ["ldm"]):  # a traceback after all the sampling, before
        with pytest.raises(UserError, match="taken.png' is a file; expected a folder for the report"):
            evaluate_main([*command, "--model", str(tiny_pipeline_dir), "--num_prompts", "4", "--two_object_prompts",
                           "0", "--out", str(tmp_path / "taken.png"), "--judge_threshold", "0"])  # fmt: skip
    assert (tmp_path / "taken.png").read_bytes() == b"mine"


def test_markdown_table_marks_default():
    row = {"setting": "ddim-2-g1", "sampler": "ddim", "steps": 2, "guidance_scale": 1.0, "colour": 0.5,
           "shape": 1.0, "size": 1.0, "position": 0.25, "relation": None, "score": 0.6875, "kid": 0.1,
           "seconds_per_image": 0.01}
    table = markdown_table([row], row)
    assert "| ddim **(default)** | 2 | 1 | 50% / - | 100% / - | 100% / - | 25% / - | - / - | 0.688 | 0.100 | 0.010 |" \
        in table


def test_an_fp16_export_loads_in_plain_diffusers_with_no_arguments(tiny_pipeline_dir, tmp_path):
    """Exactly as a diffusers user types it: `StableDiffusionPipeline.from_pretrained(folder)`; every component
    in float32 (transformers 5 would keep an fp16 text encoder beside diffusers' float32 U-Net otherwise)."""
    from diffusers import StableDiffusionPipeline

    out = export_model(tiny_pipeline_dir, tmp_path / "exported", "fp16")
    theirs = StableDiffusionPipeline.from_pretrained(out)
    assert {theirs.unet.dtype, theirs.vae.dtype, theirs.text_encoder.dtype} == {torch.float32}
    ours = LatentDiffusionPipeline.from_pretrained(out)
    images = []
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    assert abs(images[0] - images[1]).max() < 2 / 255


def test_export_fp16_halves_weights_and_loads_as_float32(tiny_pipeline_dir, tmp_path):
    model = tmp_path / "run"
    shutil.copytree(tiny_pipeline_dir, model)
    (model / RUN_CONFIG).write_text('{"train": {}}\n')
    (model / DEFAULTS_FILE).write_text('{"sampling": {"sampler": "ddim", "num_inference_steps": 3}}\n')
    (model / "checkpoint-5").mkdir()  # training leftovers are not exported
    out = export_model(model, tmp_path / "exported", "fp16")
    assert not (out / "checkpoint-5").exists() and (out / RUN_CONFIG).read_text() == '{"train": {}}\n'
    assert read_sampling_defaults(out) == {"sampler": "ddim", "num_inference_steps": 3}
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (out / part).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert folder_bytes(out) < 0.7 * folder_bytes(tiny_pipeline_dir)
    a = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    b = LatentDiffusionPipeline.from_pretrained(out)
    assert {b.unet.dtype, b.vae.dtype, b.text_encoder.dtype} == {torch.float32}
    for pipe in (a, b):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np")
    img_a = a("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    img_b = b("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(img_a - img_b).max() < 0.02  # fp16 rounding of the weights only


def test_export_refuses_bad_input(tiny_pipeline_dir, tmp_path):
    with pytest.raises(UserError, match="differ"):
        export_model(tiny_pipeline_dir, tiny_pipeline_dir)
    with pytest.raises(UserError, match="not found"):
        export_model(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
