"""Prompt adherence: prompt sampling, scoring logic, KID, and an end-to-end run on a tiny random pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_app.errors import UserError
from ldm_app.evaluate import main as evaluate_main
from ldm_app.evaluation import adherence
from ldm_app.evaluation.adherence import (
    ONE,
    TWO,
    kid,
    run_adherence,
    sample_prompts,
    score,
    write_outputs,
)
from ldm_app.evaluation.judge import (
    HEADS,
    JudgeAccuracyError,
    scene_labels,
)


def test_prompts_are_seeded_per_prompt():
    a = sample_prompts(3, 2, seed=5)
    b = sample_prompts(5, 1, seed=5)
    assert [p.text for p in a[:3]] == [p.text for p in b[:3]]  # prompt i does not depend on how many are asked
    assert a[3].text == b[5].text and a[3].seed == b[5].seed
    assert [p.kind for p in a] == [ONE, ONE, ONE, TWO, TWO]
    assert " background" in a[0].text and a[3].scene.relation in a[3].text
    assert len({p.seed for p in a}) == 5
    assert sample_prompts(3, 2, seed=6)[0].seed != a[0].seed


class _OracleJudge:
    """Predicts each prompt's own labels, except where told to be wrong: tests the scoring arithmetic alone."""

    def __init__(self, prompts, wrong: dict[tuple[int, str], int]):
        self.labels = [scene_labels(p.scene) for p in prompts]
        self.wrong = wrong

    def predict(self, images):
        out = {}
        for head in HEADS:
            values = [self.wrong.get((k, head), max(lab[head], 0)) for k, lab in enumerate(self.labels)]
            out[head] = torch.tensor(values)
        return out


def test_score_counts_attributes_and_relations():
    prompts = sample_prompts(4, 2, seed=0)
    labels = [scene_labels(p.scene) for p in prompts]
    wrong = {
        (0, "colour"): (labels[0]["colour"] + 1) % len(HEADS["colour"]),
        (1, "count"): 1,  # judged two objects: count wrong, attributes still scored
        (4, "second_shape"): (labels[4]["second_shape"] + 1) % len(HEADS["second_shape"]),
    }
    summary, records = score(_OracleJudge(prompts, wrong), prompts, torch.zeros(6, 3, 8, 8))
    one, two = summary["one_object"], summary["two_object"]
    assert one["num_prompts"] == 4 and two["num_prompts"] == 2
    assert one["accuracy"]["colour"] == 0.75 and one["accuracy"]["shape"] == 1.0
    assert one["accuracy"]["count"] == 0.75 and one["accuracy"]["all_attributes"] == 0.75
    assert two["relation_accuracy"] == 0.5 and two["accuracy"]["axis"] == 1.0
    assert [r["correct"] for r in records] == [False, True, True, True, False, True]
    assert records[2]["judged"] == prompts[2].text  # a right verdict reads back as the prompt


def test_kid_same_distribution_near_zero_and_shift_positive():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen)
    y = torch.randn(400, 16, generator=gen)
    same = kid(x, y, num_subsets=50)
    shifted = kid(x, y + 0.5, num_subsets=50)
    assert abs(same["mean"]) < 0.05
    assert shifted["mean"] > 0.5 and shifted["mean"] > 10 * abs(same["mean"]) + 5 * shifted["std"]
    assert same["subset_size"] == 200
    with pytest.raises(UserError):
        kid(x[:3], y, subset_size=5)


def test_end_to_end_in_process(tiny_pipeline, tiny_judge, tmp_path):
    with pytest.raises(JudgeAccuracyError):  # a judge below the default 99% gate judges nothing
        run_adherence(tiny_pipeline, 3, 2, seed=0, steps=2, judge=tiny_judge, log=lambda _: None)
    original = type(tiny_pipeline.scheduler)
    def run(batch_size):
        return run_adherence(tiny_pipeline, 3, 2, seed=0, sampler="euler", steps=2, guidance_scale=3.0,
                             batch_size=batch_size, judge=tiny_judge, kid_subsets=5, judge_threshold=0.0,
                             log=lambda _: None)

    result = run(2)
    assert type(tiny_pipeline.scheduler) is original  # the sampler was swapped for this call only
    report = result.report
    assert report["settings"]["sampler"] == "euler" and report["settings"]["steps"] == 2
    assert result.images.shape == (5, 3, 64, 64) and 0 <= result.images.min() <= result.images.max() <= 1
    assert set(report["one_object"]["accuracy"]) >= {"colour", "shape", "size", "position", "background"}
    assert 0.0 <= report["two_object"]["relation_accuracy"] <= 1.0
    assert report["kid"]["real_vs_real"]["subset_size"] == 2 and report["seconds_per_image"] > 0
    # batching does not change the images: image k comes from its own generator
    again = run(5)
    assert torch.allclose(again.images, result.images, atol=1e-5)
    report_path, grid_path = write_outputs(result, tmp_path / "out")
    assert json.loads(report_path.read_text())["per_prompt"][0]["prompt"] == result.prompts[0].text
    assert Image.open(grid_path).size[0] > 5 * 64


def test_cli_writes_report_and_refuses_weak_judge(tiny_pipeline_dir, tiny_judge_cache, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    cache = tiny_judge_cache
    base = [
        "--model",
        str(model),
        "--num_prompts",
        "3",
        "--two_object_prompts",
        "1",
        "--steps",
        "2",
        "--batch_size",
        "4",
        "--kid_subsets",
        "3",
        "--judge_cache",
        str(cache),
        "--device",
        "cpu",
    ]
    with pytest.raises(JudgeAccuracyError, match="held-out"):
        evaluate_main(["ldm", *base, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # nothing judged, nothing written
    evaluate_main(["ldm", *base, "--judge_threshold", "0", "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / adherence.REPORT_FILE).read_text())
    assert report["settings"]["steps"] == 2 and report["settings"]["guidance_scale"] == 7.5  # model's fallback
    assert len(report["per_prompt"]) == 4 and report["model"] == str(model.resolve())
    assert (tmp_path / "eval" / adherence.GRID_FILE).is_file()
    assert "domain KID" in capsys.readouterr().out


def test_a_stop_swallowed_while_sampling_ends_the_evaluation_before_the_next_batch(
        tiny_pipeline_dir, tiny_judge_cache, tmp_path, monkeypatch):
    """A Ctrl-C whose exception C code cleared (ldm_app.errors) stops `evaluate ldm` at its next batch: exit status
    130, no batch after it, no report written as if all prompts had been judged."""
    import signal

    from ldm_helpers import swallow_a_stop_in

    from ldm_app.errors import run_cli
    from ldm_app.pipeline import LatentDiffusionPipeline

    calls = swallow_a_stop_in(monkeypatch, LatentDiffusionPipeline, "__call__", signal.SIGINT)
    out = tmp_path / "eval"
    argv = ["ldm", "--model", str(tiny_pipeline_dir), "--num_prompts", "3", "--two_object_prompts", "3", "--steps",
            "1", "--batch_size", "2", "--judge_cache", str(tiny_judge_cache), "--judge_threshold", "0", "--device",
            "cpu", "--out", str(out)]
    assert run_cli(evaluate_main, argv) == 130
    assert len(calls) == 2 and not (out / adherence.REPORT_FILE).exists()


def test_reports_of_the_bundled_model_go_outside_the_package(tmp_path):
    """The bundled model lives in the package (site-packages when installed): its reports go to runs/, another
    model's beside it."""
    from ldm_app import DEFAULT_MODEL

    assert adherence.report_folder(Path(DEFAULT_MODEL), "eval") == Path("runs/eval/default_model")
    assert adherence.report_folder(tmp_path / "mine", "sweep") == tmp_path / "mine" / "sweep"
