"""`python -m ldm_app.evaluate ceiling`: what an autoencoder lets through of the adherence prompts, by both judges,
and the --min_accuracy gate recipes/shapes.sh uses to retrain an autoencoder that loses colours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_app.config import AutoencoderConfig
from ldm_app.evaluation.ceiling import reconstruction_ceiling, summary_line
from ldm_app.models import build_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def test_identity_keeps_everything_and_a_channel_swap_loses_the_colours(tiny_judge):
    kept = reconstruction_ceiling(lambda x: x, tiny_judge, num_prompts=24, two_object_prompts=8)
    geo = kept["geometric"]
    assert geo["one_object"]["all_attributes"] == 1.0 and geo["relation"] == 1.0  # renders: the measure's own 1.000
    assert kept["one_object_all_attributes"] <= geo["one_object"]["all_attributes"]  # the harsher of the two
    swapped = reconstruction_ceiling(lambda x: x[:, [2, 1, 0]], tiny_judge, num_prompts=24, two_object_prompts=8)
    # red <-> blue, and orange/yellow turn blue-ish: most colours change, shapes and places do not
    assert swapped["geometric"]["one_object"]["colour"] < 0.6
    assert swapped["geometric"]["one_object"]["shape"] == 1.0
    assert swapped["one_object_all_attributes"] < 0.6
    assert "one-object all attributes" in summary_line(swapped) and "relation" in summary_line(swapped)


def _random_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, sample_size=64))
    vae.save_pretrained(folder / "vae", safe_serialization=True)  # the train_vae.py layout: OUT/vae
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_app.evaluate", "ceiling", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_gate_fails_on_an_untrained_autoencoder_and_keeps_the_report(tmp_path, tiny_judge_cache):
    model = _random_vae(tmp_path / "run")
    report_path = tmp_path / "out" / "ceiling.json"
    common = ["--model", str(model), "--num_prompts", "8", "--two_object_prompts", "4", "--judge_cache",
              str(tiny_judge_cache), "--judge_threshold", "0", "--json", str(report_path)]
    proc = _cli(*common, "--min_accuracy", "0.5")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "below --min_accuracy 0.5" in lines[0], proc.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and report["one_object_all_attributes"] < 0.5  # random weights: grey mush
    assert "reconstructions:" in proc.stdout
    proc = _cli(*common)  # the report is there: refused in one line, before any work, and kept
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr, proc.stderr
    assert json.loads(report_path.read_text())["passed"] is False
    proc = _cli(*common, "--overwrite")  # no gate: the same report, passed
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report_path.read_text())["passed"] is True


@pytest.mark.parametrize("args, message", [
    (["--model", "nowhere"], "not an autoencoder folder"),
    (["--model", ".", "--min_accuracy", "2"], "--min_accuracy must be between 0 and 1"),
    (["--model", ".", "--num_prompts", "0", "--two_object_prompts", "8"], "--num_prompts must be >= 1"),
])
def test_cli_errors_are_one_line(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
