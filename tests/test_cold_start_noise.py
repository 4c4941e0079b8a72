"""`python generate.py PROMPT` with the bundled model writes nothing to stderr but our own lines.

Library noise crept in before: transformers 5 printed two "requires torchvision" lines on every run (importing
diffusers' SD pipelines imports CLIPImageProcessor for the safety checker). The run here is the user's plain one
(no HF_HUB_OFFLINE, the model's stored settings); its speed is measured in benchmarks/bench_cold_start.py, not here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ours: the sampling progress bar (desc "images a-b of n", redrawn with carriage returns) and ldm_app's
# "WARNING: ..." lines (e.g. the unknown-words line, not expected for this prompt)
PROGRESS = re.compile(r"^images \d+-\d+ of \d+: ")


def test_generate_writes_only_our_own_lines_to_stderr(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["OMP_NUM_THREADS"] = "1"  # the suite's processes share 2 cores; the noise does not depend on threads
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "a large red circle in the center on a white background",
         "--output", str(tmp_path), "--seed", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1
    lines = [part for line in result.stderr.splitlines() for part in line.split("\r") if part.strip()]
    assert lines, "expected the progress bar on stderr"
    noise = [line for line in lines if not PROGRESS.match(line)]
    assert noise == [], noise
    assert result.stdout.splitlines()[0].startswith("model: ") and "wrote " in result.stdout
