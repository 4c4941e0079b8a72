"""A 2-process CPU run (torchrun, gloo): data sharded over processes, latents cached in shards, checkpoints and
the output pipeline written once. Kept tiny: the test machine may have only 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from ldm_helpers import ROOT, run_args, subprocess_env


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_cpu_run(ldm_files, tmp_path):
    out = tmp_path / "out"
    argv = run_args(ldm_files, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--cache_latents",
                    "--set", "train.log_every=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_ldm.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x 1 accumulation x 2 process(es) = 4" in proc.stderr
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text()) == {
        "step": 2, "micro_step": 2, "epoch": 0, "batch": 2}  # 8 images / (2 x 2 processes): 2 batches an epoch
    assert (out / "checkpoint-3").is_dir() and (out / "model_index.json").is_file()
    assert len(list((out / "latent_cache").glob("latents-*.safetensors"))) == 1
    assert not list((out / "latent_cache").glob(".*part*"))  # shards merged and removed

    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 4
