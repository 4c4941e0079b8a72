"""Two "machines" on one: two torchrun launches (--nnodes 2 --nproc_per_node 1, node ranks 0 and 1, static
rendezvous on 127.0.0.1) started as separate processes train the tiny LDM config and must end with the weights of
one torchrun launch of 2 processes (same global batch, 2 x 2): the node split must change nothing. A 1-process run
(global batch 2) is the control: it must end elsewhere, so the equality means something.

Why no 1-process run with the same global batch (batch 4, or 2 x 2 accumulation): every random draw of a step comes
from a generator seeded by (seed, micro step, process), so 1 process and 2 draw different noise and timesteps;
test_multiprocess.py does not establish that equivalence either. Kept small: the test machine may have 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ldm_helpers import ROOT, max_abs_diff, run_args, subprocess_env, weights

TIMEOUT = 240  # seconds per launch; a run here takes ~15 s
CHECKPOINT_FILES = ("model.safetensors", "model_1.safetensors", "ema.safetensors")  # U-Net, text encoder, EMA


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo"}  # gloo on the loopback only


def train_argv(files, out: Path) -> list[str]:
    return run_args(files, out, "--max_train_steps", "3", "--checkpointing_steps", "3", "--cache_latents",
                    "--report_to", "none")


def run_one(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_two_nodes(files, out: Path, logs: Path) -> str:
    """Node 0 and node 1 as two torchrun launches; returns node 0's stderr. Both are killed (with their workers:
    each launch is its own process group) as soon as either fails, or when the pair outlives TIMEOUT."""
    port = free_port()
    procs, streams, codes = [], [], [None, None]
    try:
        for rank in (1, 0):  # node 1 first: it must wait at the rendezvous for node 0
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--rdzv_backend", "static", "--master_addr", "127.0.0.1",
                   "--master_port", str(port), "--max_restarts", "0", str(ROOT / "train_ldm.py"),
                   *train_argv(files, out)]
            err = open(logs / f"node{rank}.log", "w")
            streams.append(err)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env(), cwd=ROOT,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # until both end, or one fails (the other would wait for it)
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # SIGTERM: torchrun passes it on to its workers (each in a process group of its own)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for s in streams:
            s.close()
    node0, node1 = ((logs / f"node{r}.log").read_text() for r in (0, 1))
    assert codes == [0, 0], (f"node 1 exit {codes[0]} (None: killed):\n{node1[-2000:]}\n"
                             f"node 0 exit {codes[1]}:\n{node0[-2000:]}")
    return node0


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_nodes_match_one_node_of_two_processes(ldm_files, tmp_path):
    nodes = tmp_path / "nodes"
    log = run_two_nodes(ldm_files, nodes, tmp_path)
    assert "2 x 1 accumulation x 2 process(es) = 4" in log
    assert json.loads((nodes / "checkpoint-3" / "training_state.json").read_text()) == {
        "step": 3, "micro_step": 3, "epoch": 1, "batch": 1,  # 8 images / (2 x 2 processes): 2 batches an epoch
        "num_processes": 2}
    assert {p.name for p in (nodes / "checkpoint-3").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # both nodes took part in the checkpoint
    assert (nodes / "model_index.json").is_file()
    assert len(list((nodes / "latent_cache").glob("latents-*.safetensors"))) == 1  # both nodes' shards merged

    one_node = tmp_path / "one_node"
    run_one([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "train_ldm.py"), *train_argv(ldm_files, one_node)])
    for name in CHECKPOINT_FILES:
        a, b = weights(one_node / "checkpoint-3" / name), weights(nodes / "checkpoint-3" / name)
        assert max_abs_diff(a, b) <= 1e-6, name

    # control: another global batch (1 process x 2) ends elsewhere
    single = tmp_path / "single"
    run_one([sys.executable, str(ROOT / "train_ldm.py"), *train_argv(ldm_files, single)])
    a, b = weights(single / "checkpoint-3" / "model.safetensors"), weights(nodes / "checkpoint-3" / "model.safetensors")
    assert max_abs_diff(a, b) > 1e-4
