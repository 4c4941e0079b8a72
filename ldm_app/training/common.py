"""Pieces both training loops share: the accelerator, a data order that a resumed run can re-enter mid-epoch,
per-step random generators, the optimiser and the LR schedule, and handing freed memory back to the OS.

Exact resume by construction: the data order of epoch e is a permutation drawn from (seed, e), and every random
draw of step s (timesteps, noise, caption dropout, latent sampling) comes from a generator seeded by
(seed, s, process). A resumed run therefore needs only (step, epoch, batch-in-epoch) besides the weights and
optimiser state that accelerate saves; no global RNG state has to round-trip.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    """INFO on the main process, warnings only on the others (torchrun / accelerate launch set RANK)."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        level=logging.INFO if main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint


def open_run_folder(output_dir: str, run_config: dict[str, Any], resume: str | None,
                    may_differ: tuple[str, ...]) -> tuple[Path, Path | None]:
    """Check the output folder before any work: (folder, checkpoint to resume from or None)."""
    from ..checkpointing import check_run_folder, resolve_resume
    from ..errors import UserError

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {str(out)!r} is a file, not a folder")
    checkpoint = resolve_resume(out, resume)
    check_run_folder(out, run_config, resuming=checkpoint is not None, may_differ=may_differ)
    return out, checkpoint


def launched_processes() -> int:
    """The number of training processes the launcher started (torchrun / accelerate launch set WORLD_SIZE), known
    before the accelerator exists, so checks that depend on it can run before the output folder is touched."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def make_accelerator(cfg: TrainConfig, output_dir: str | Path, cpu: bool = False):
    """accelerate owns device placement, mixed precision, distribution and gradient accumulation. Processes
    started by torchrun on a machine without CUDA get a gloo process group: accelerate builds one only when told
    to use the CPU."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs"))
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=project,
        cpu=cpu,
    )


def step_generator(seed: int, step: int, process_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one optimisation step on one process (see module docstring)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 1_009 + process_index) % (2**63 - 1))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class Position:
    """Where the data stream stands: `batch` batches of `epoch` are already consumed (per process)."""

    epoch: int = 0
    batch: int = 0


def batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    accelerator: Any,
    start: Position,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[Position, Any]]:
    """Endless stream of (position after this batch, batch), sharded over processes by accelerate, starting at
    `start` (mid-epoch on resume: the first `start.batch` batches of that epoch are skipped, not replayed)."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    epoch, skip = start.epoch, start.batch
    while True:
        order = epoch_permutation(len(dataset), seed, epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate_fn,
                            num_workers=num_workers, drop_last=True)
        loader = prepare_data_loader(loader, device=accelerator.device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=True)
        if skip:
            loader = skip_first_batches(loader, skip)
        for i, batch in enumerate(loader, start=skip):
            yield Position(epoch, i + 1), batch
        epoch, skip = epoch + 1, 0


class EmptyBatchGuard:
    """Stops a training loop that finds no usable batch: a batch whose images were all unreadable is skipped,
    and without this a folder of unreadable files skipped forever. `skip(empty, ...)` returns `empty`, after
    raising a one-line UserError once 3 epochs' worth of batches in a row were empty. `empty` must be decided
    by every process together (a gathered flag), so all processes stop at the same batch."""

    EPOCHS = 3

    def __init__(self, num_images: int, batch_size: int, num_processes: int):
        self.limit = self.EPOCHS * max(batches_per_epoch(num_images, batch_size, num_processes), 1)
        self.num_processes = num_processes
        self.run = 0

    def skip(self, empty: bool, skipped_loads: int, dataset: Any) -> bool:
        from ..errors import UserError

        self.run = self.run + 1 if empty else 0
        if self.run >= self.limit:
            first = getattr(dataset, "first_error", None)
            raise UserError(
                f"{self.run} batches in a row ({self.EPOCHS} epochs) held no readable image"
                f"{' on some process' if self.num_processes > 1 else ''}: too few of the {len(dataset)} training "
                f"images are readable ({skipped_loads} unreadable loads{f', first: {first}' if first else ''}); "
                "fix or remove the unreadable files")
        return empty


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; False where there is none).

    Why by hand: on Linux, glibc keeps memory that PyTorch's CPU tensors freed inside the process's heap. In a
    2-process shapes recipe run (2026-12-01) the two training processes grew to 14.6 and 9.5 GB of a 24 GB machine
    by step 5,750 and stalled, while malloc_stats showed under 0.5 GB in use; malloc_trim(0) brought a process from
    1.89 to 1.02 GB. No library call does this, so the training loops call it every `log_every` steps."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def batches_per_epoch(n: int, batch_size: int, num_processes: int) -> int:
    return n // (batch_size * num_processes)


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=cfg.fused_adam or None)


def effective_lr(cfg: TrainConfig, num_processes: int) -> float:
    """With `scale_lr`, the LR grows linearly with the effective batch (batch x accumulation x processes)."""
    if not cfg.scale_lr:
        return cfg.learning_rate
    return cfg.learning_rate * cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, num_processes: int = 1):
    """diffusers' LR schedules, counted in optimisation steps. accelerate's prepared scheduler steps once per
    process per optimisation step, so the schedule's lengths are scaled by the process count (as in diffusers'
    training scripts) to keep warm-up and decay in optimisation steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                         num_training_steps=cfg.max_train_steps * num_processes)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], per image: 10 log10(MAX^2 / MSE) with MAX = 2."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def epochs_for(steps: int, per_epoch: int) -> int:
    return math.ceil(steps / max(per_epoch, 1))
