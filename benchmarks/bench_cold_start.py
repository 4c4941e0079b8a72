"""Cold start of `python generate.py PROMPT` against the libraries' floor, in one run.

The floor is a fresh `python -c` that imports exactly the library pieces a plain run needs (torch; diffusers'
UNet2DConditionModel, AutoencoderKL and the bundled model's scheduler; transformers' CLIPTextModel and
CLIPTokenizer) and exits. Ours is `python generate.py PROMPT --output <tmpdir>` end to end (the bundled model unless
--model). The two alternate, N times each, and the order rotates every round (floor-ours, ours-floor, ...): on a
shared machine a burst of load then hits both alike, which a block of N floors followed by N of ours would not.
`--compare DIR` adds a third kind in the same rotation: another checkout's generate.py (e.g. `git archive` of an
earlier commit unpacked in DIR), for a before/after under the same load.

Per process: wall time of the subprocess (process start to exit), time to the PNG (process start to the PNG's
mtime; for the floor, to a marker file written the moment its imports are done: "process start to PNG written"
against "the bare import", the comparison issue #19 asks for, without either process's exit, which for torch
takes a second of its own) and CPU seconds (user + sys, from wait4; less disturbed by other
processes than wall time). Printed: the medians, the median of the per-round differences, the load average before
and after (a busy machine makes every figure larger), and every stderr line of ours that is not one of our own
messages (the sampling progress bar, "WARNING: ..." lines of ldm_app's logger): library noise, which must be none.

    python benchmarks/bench_cold_start.py --runs 5
    python benchmarks/bench_cold_start.py --runs 5 --threads 1 --compare /tmp/before   # CPU figures under load
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ("import torch; from diffusers import UNet2DConditionModel, AutoencoderKL, DPMSolverMultistepScheduler; "
         "from transformers import CLIPTextModel, CLIPTokenizer")  # fmt: skip
# our own stderr lines: the sampling progress bar (tqdm, desc "images a-b of n") and ldm_app's "WARNING: ..." lines
OWN_LINE = re.compile(r"^(images \d+-\d+ of \d+:|WARNING: )")


def run_once(cmd: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float, float, str]:
    """(start epoch, wall s, CPU s, stderr): Popen + os.wait4 so the CPU time is this child's alone."""
    start_epoch, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()  # to EOF: the child has closed stderr, i.e. it is exiting
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = err.decode("utf-8", "replace")
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])}... failed (exit {proc.returncode}):\n{text[-2000:]}")
    return start_epoch, wall, usage.ru_utime + usage.ru_stime, text


def stderr_lines(text: str) -> list[str]:
    """Lines as a terminal would show them: a progress bar's carriage-return redraws are one line."""
    return [line.split("\r")[-1] if line.split("\r")[-1].strip() else line for line in text.splitlines() if line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="processes of each kind (default 5)")
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--model", help="a model folder (default: the bundled model)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process (default: torch's own choice); "
                   "1 keeps CPU figures meaningful on a machine other processes are using")
    p.add_argument("--compare", metavar="DIR", help="also time DIR/generate.py (another checkout) in the rotation")
    args = p.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    checkouts = {"ours": ROOT} | ({f"compare ({args.compare})": Path(args.compare)} if args.compare else {})
    kinds = ["floor", *checkouts]
    times: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
    diffs: dict[str, list[float]] = {kind: [] for kind in checkouts}
    noise: list[str] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            order = kinds[k % len(kinds):] + kinds[: k % len(kinds)]  # rotated: each kind goes first in turn
            row = {}
            for kind in order:
                out = Path(tmp) / f"{kinds.index(kind)}-{k}"
                if kind == "floor":  # the marker file is the floor's "PNG": written the moment the imports are done
                    out.mkdir()
                    command = [args.python, "-c", f"{FLOOR}; open({str(out / 'imported.png')!r}, 'w').close()"]
                else:  # the checkout's own ldm_app: python puts the script's folder first on sys.path
                    command = [args.python, str(checkouts[kind] / "generate.py"), args.prompt, "--output", str(out),
                               "--seed", str(k)] + (["--model", args.model] if args.model else [])  # fmt: skip
                start, wall, cpu, err = run_once(command, tmp, env)
                pngs = list(out.glob("*.png"))
                if len(pngs) != 1:
                    sys.exit(f"expected one PNG in {out}, found {len(pngs)}")
                to_png = pngs[0].stat().st_mtime - start
                if kind != "floor":
                    noise += [line for line in stderr_lines(err) if not OWN_LINE.match(line)]
                times[kind].append((wall, cpu, to_png))
                row[kind] = (wall, to_png)
            for kind in checkouts:
                diffs[kind].append((row[kind][0] - row["floor"][0], row[kind][1] - row["floor"][1]))
            print(f"round {k + 1}: " + ", ".join(f"{kind} {row[kind][0]:.2f} s" for kind in kinds), flush=True)
    load_after = os.getloadavg()

    def med(kind, i):
        return statistics.median(v[i] for v in times[kind])

    print(f"\nload average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
    print(f"\n| median of {args.runs} | wall s | CPU s (user+sys) | to PNG s (floor: to imports done) "
          "| to PNG - floor's imports (per-round median) | wall - floor (per-round median) | CPU - floor |")
    print("|---|---|---|---|---|---|---|")
    print(f"| floor: bare import | {med('floor', 0):.2f} | {med('floor', 1):.2f} | {med('floor', 2):.2f} | | | |")
    for kind in checkouts:
        print(f"| {kind}: generate.py | {med(kind, 0):.2f} | {med(kind, 1):.2f} | {med(kind, 2):.2f} "
              f"| **{statistics.median(d[1] for d in diffs[kind]):+.2f}** "
              f"| {statistics.median(d[0] for d in diffs[kind]):+.2f} | {med(kind, 1) - med('floor', 1):+.2f} |")
    print(f"\nstderr lines of generate.py other than our own messages: {len(noise)}")
    for line in dict.fromkeys(noise):
        print(f"  {line}")


if __name__ == "__main__":
    main()
