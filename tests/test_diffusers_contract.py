"""Our pipelines against diffusers' own tests: every test of diffusers' fast test classes for the Stable Diffusion
text-to-image, image-to-image and inpainting pipelines (v0.40.0 source, vendored in tests/diffusers_contract/) that
passes for diffusers' class must pass with `pipeline_class` set to ours.

Both runs happen here, side by side, in subprocesses (their pytest settings are not ours); nothing is recorded in
advance, so a diffusers upgrade that changes what passes for diffusers changes the bar with it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "diffusers_contract"
ROOT = HERE.parents[1]
OURS = {
    "StableDiffusionPipeline": "ldm_app.pipeline.LatentDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "ldm_app.pipeline.LatentDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "ldm_app.pipeline.LatentDiffusionInpaintPipeline",
}
# the fast classes on one CPU: no integration/nightly (hub models), memory (accelerator), IP-adapter (hub image
# encoder), single-file download or device-map classes
SELECTION = "not Integration and not Nightly and not Slow and not Memory and not IPAdapter and not Ckpt and not DeviceMap"


def start(classes: dict[str, str] | None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
               CONTRACT_CLASSES=",".join(f"{k}={v}" for k, v in (classes or {}).items()), OMP_NUM_THREADS="1")  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-c", str(HERE / "pytest.ini"), "--rootdir", str(HERE),
               "--noconftest", "-p", "contract_plugin", "-q", "-rA", "-k", SELECTION,
               "v0_40/pipelines/stable_diffusion"]  # fmt: skip
    return subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outcomes(process: subprocess.Popen) -> dict[str, set[str]]:
    out, _ = process.communicate(timeout=1200)
    found: dict[str, set[str]] = {"PASSED": set(), "FAILED": set(), "ERROR": set()}
    for line in out.splitlines():
        match = re.match(r"^(PASSED|FAILED|ERROR) (\S+)", line)
        if match:
            found[match.group(1)].add(match.group(2))
    if not any(found.values()):
        pytest.fail(f"the vendored diffusers tests did not run:\n{out[-3000:]}")
    return found


@pytest.fixture(scope="module")
def runs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    theirs, ours = start(None), start(OURS)  # two processes: one core each
    return outcomes(theirs), outcomes(ours)


def test_diffusers_tests_pass_for_our_pipelines_wherever_they_pass_for_diffusers(runs):
    theirs, ours = runs
    for module in ("test_stable_diffusion.py", "test_stable_diffusion_img2img.py", "test_stable_diffusion_inpaint.py"):
        assert sum(module in name for name in theirs["PASSED"]) >= 15, f"too few diffusers tests ran in {module}"
    missing = sorted(theirs["PASSED"] - ours["PASSED"])
    assert not missing, f"{len(missing)} diffusers tests pass for diffusers but not for ours: {missing[:10]}"


def test_the_text_to_image_class_passes_every_test_diffusers_passes(runs):
    theirs, ours = runs
    text_to_image = {n for n in theirs["PASSED"] if "::TestStableDiffusionPipeline::" in n}
    assert len(text_to_image) >= 38  # 38 of the class's tests pass for diffusers on CPU (2 need the hub)
    assert text_to_image <= ours["PASSED"]
