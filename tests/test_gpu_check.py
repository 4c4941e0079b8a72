"""benchmarks/gpu_check.py without a GPU: its --smoke run (tiny sizes, CPU, fp32) must print every row, with a
positive finite figure for each row the CPU can run and "skipped: no CUDA" for the others, and write JSON that
agrees with the table; a worker that hangs or dies marks its rows instead of losing the table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    # a script, not a package module: load it by path (its top level imports the standard library only)
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """name -> the cells of its markdown table line."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("row", "---"):
            assert cells[0] not in out, f"row {cells[0]} printed twice"
            out[cells[0]] = cells
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(tmp / "rows.json"),
                           "--workdir", str(tmp / "work")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads((tmp / "rows.json").read_text())


def test_smoke_table_has_every_row_with_a_figure_or_a_reason(smoke: tuple[str, dict]) -> None:
    stdout, report = smoke
    expected = gc.rows(gc.SMOKE)
    printed = table_rows(stdout)
    assert list(printed) == [r.name for r in expected]  # every row, once, in order
    by_name = {r["name"]: r for r in report["rows"]}
    assert list(by_name) == [r.name for r in expected]
    assert report["smoke"] is True and report["env"]["cuda"] is False
    units = {"gen": "s/image", "train": "img/s"}
    for row in expected:
        rec, cells = by_name[row.name], printed[row.name]
        if row.cuda_only:
            assert rec["status"] == "skipped: no CUDA", row.name
            assert cells[2] == "skipped: no CUDA"
            continue
        # a row the CPU can run must run: a script that failed every row would otherwise pass
        assert rec["status"] == "ok", (row.name, rec["status"])
        assert math.isfinite(rec["value"]) and rec["value"] > 0, (row.name, rec["value"])
        assert rec["unit"] == units[row.group]
        assert cells[2] == gc.fmt_value(rec) and cells[2].endswith(rec["unit"])
        assert rec["wall_s"] > 0


def test_smoke_training_rows_read_the_trainers_log(smoke: tuple[str, dict]) -> None:
    """img/s comes from train_ldm's own log windows: the first (warm-up) one is reported beside it."""
    report = smoke[1]
    for rec in report["rows"]:
        if rec["name"].startswith("train_") and rec["status"] == "ok":
            assert rec["note"].startswith("first window ") and "img/s" in rec["note"]
            assert rec["run_s"] > 0


def test_a_hung_or_dead_worker_is_reported_not_fatal(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hung = gc.run_group([sys.executable, "-c", "import time; time.sleep(60)"], 1, log)
    assert hung == "group timed out after 1 s"
    dead = gc.run_group([sys.executable, "-c", "print('starting'); raise SystemExit('out of memory')"], 30, log)
    assert dead == "worker exited 1: out of memory"
    assert gc.run_group([sys.executable, "-c", "pass"], 30, log) is None


def test_rows_a_worker_did_not_write_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The orchestrator alone (no torch): with the workers replaced by one that writes nothing and fails, every row
    of the groups it ran carries that failure, and the table and JSON still come out."""
    monkeypatch.setattr(gc, "group_command", lambda group, tail, acc: [sys.executable, "-c", "raise SystemExit(3)"])
    out = tmp_path / "r.json"
    assert gc.main(["--groups", "gen", "--json", str(out), "--workdir", str(tmp_path / "w")]) == 0
    rows = {r["name"]: r["status"] for r in json.loads(out.read_text())["rows"]}
    assert rows["gen_sd15_fp16_b1"] == "failed: worker exited 3: no output"
    assert rows["train_full_cached"] == "skipped: not selected (--groups)"
    assert set(table_rows(capsys.readouterr().out)) == set(rows)
