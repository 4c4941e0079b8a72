"""Helpers shared by the train_ldm.py tests (test_train_ldm.py, test_latent_cache.py, test_multiprocess.py); their
fixtures (`ldm_files`, `fresh_accelerate`) live in conftest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ldm" / "tiny.yaml"


@dataclass
class LDMFiles:
    data: Path  # 8 captioned 32 px shapes images
    vae: Path  # a random f=4 AutoencoderKL (3 levels, 4 latent channels)
    root: Path


def make_ldm_files(root: Path, **dataset: Any) -> LDMFiles:
    """The autoencoder and 8 renders; `dataset` passes shapes options (e.g. labels=True, sizes=True)."""
    from ldm_app.config import AutoencoderConfig
    from ldm_app.data.shapes import make_dataset
    from ldm_app.models import build_autoencoder

    torch.manual_seed(0)
    vae_cfg = AutoencoderConfig(block_out_channels=(8, 8, 8), norm_num_groups=8, latent_channels=4, sample_size=32)
    build_autoencoder(vae_cfg).save_pretrained(root / "vae")
    make_dataset(root / "data", num_images=8, resolution=32, seed=0, **dataset)
    return LDMFiles(root / "data", root / "vae", root)


def run_args(files: LDMFiles, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--train_data_dir", str(files.data), "--pretrained_vae", str(files.vae),
            "--output_dir", str(out), *extra]


def subprocess_env() -> dict[str, str]:
    # one thread per process: on a shared 2-core machine, thread oversubscription makes torch 10-100x slower
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def kill_after_first_checkpoint(command: list[str], out: Path, log_path: Path) -> None:
    """Start a trainer (`command`, checkpointing into `out`) in its own process, SIGKILL it as soon as its first
    checkpoint exists, and check that the signal is what ended it (else the tail of its log)."""
    from ldm_app.checkpointing import list_checkpoints

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)
        deadline = time.monotonic() + 300
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, log_path.read_text()[-2000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def make_text_matter(unet: Any, factor: float = 30.0) -> None:
    """Scale a random U-Net's cross-attention outputs, which otherwise barely read the text (so that a caption, or
    guidance, changes its output), in place."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight *= factor


def distill_argv(teacher: Path, out: Path, config: Path, *extra: str) -> list[str]:
    """python -m ldm_app.train_distill's arguments: `teacher` with its renders beside it (teacher.parent / "data")."""
    return ["--teacher", str(teacher), "--train_data_dir", str(teacher.parent / "data"), "--output_dir", str(out),
            "--config", str(config), *extra]


def run_in_process(main: Any, argv: list[str]) -> Any:
    """A trainer's main(argv) in this process on one torch thread (see subprocess_env), accelerate's process-wide
    singletons reset afterwards (for module-scoped fixtures, which cannot use the `fresh_accelerate` fixture)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def assert_refused_in_one_line(main: Any, argv: list[str], capsys: Any, out: Path, *words: str) -> None:
    """A CLI main with `argv` (through errors.run_cli): exit 2, one "error: " line naming each of `words`, and no
    output folder `out`."""
    from ldm_app.errors import run_cli

    rc = run_cli(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def swallowed_stop(sig: int) -> None:
    """Signal `sig` as run_cli's handler receives it (recorded for raise_if_stopped), its exception swallowed, as
    numpy's array coercion can swallow it (ldm_app.errors)."""
    from ldm_app import errors

    try:
        errors._stopped(sig, None)
    except KeyboardInterrupt:
        pass


def swallow_a_stop_in(monkeypatch: Any, cls: type, name: str, sig: int, on_call: int = 2) -> list[int]:
    """Patch method `cls.name` so that its `on_call`-th call gets a swallowed stop (above) before it runs as usual;
    returns the list that records each call."""
    calls: list[int] = []
    method = getattr(cls, name)

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == on_call:
            swallowed_stop(sig)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, patched)
    return calls
