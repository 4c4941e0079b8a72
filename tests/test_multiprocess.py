"""A 2-process CPU run (torchrun, gloo): data sharded over processes, latents cached in shards, checkpoints and
the output pipeline written once, and a resume of it that ends with the same weights. Kept tiny: the test machine
may have only 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from ldm_helpers import ROOT, max_abs_diff, run_args, subprocess_env, weights


def torchrun_train(files, out, *extra: str) -> subprocess.CompletedProcess:
    argv = run_args(files, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--cache_latents",
                    "--set", "train.log_every=1", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_ldm.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_cpu_run(ldm_files, tmp_path):
    out = tmp_path / "out"
    proc = torchrun_train(ldm_files, out)
    assert "2 x 1 accumulation x 2 process(es) = 4" in proc.stderr
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text()) == {
        "step": 2, "micro_step": 2, "epoch": 0, "batch": 2,  # 8 images / (2 x 2 processes): 2 batches an epoch
        "num_processes": 2}
    assert (out / "checkpoint-3").is_dir() and (out / "model_index.json").is_file()
    assert len(list((out / "latent_cache").glob("latents-*.safetensors"))) == 1
    assert not list((out / "latent_cache").glob(".*part*"))  # shards merged and removed

    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 4

    # Resume the same run from checkpoint-2 (the EMA is read back on every process, whose device is "cpu:N"):
    # it must end at the weights the straight run reached.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-3")
    proc = torchrun_train(ldm_files, resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = weights(out / "checkpoint-3" / name), weights(resumed / "checkpoint-3" / name)
        assert max_abs_diff(a, b) <= 1e-6, name
