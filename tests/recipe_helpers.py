"""Running a recipe as bash runs it, with `python` on PATH replaced by a recorder (the stages themselves take
hours): each call is appended to calls.txt, and the recorder script (given by the test) says what each stage leaves
behind and how it exits."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What every recorder starts with: log the call; `arg --flag "$@"` reads a flag's value.
RECORDER_HEAD = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
arg() { local want=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done; }
"""


def run_recipe(tmp_path: Path, recipe: str, recorder: str, out: Path, **env: str,
               ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs `bash recipes/RECIPE OUT` with NPROC=1 and the recorder as `python`; returns the process and the calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(RECORDER_HEAD + recorder)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "NPROC": "1", **env}
    proc = subprocess.run(["bash", f"recipes/{recipe}", str(out)], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=60)
    return proc, calls.read_text().splitlines() if calls.exists() else []
