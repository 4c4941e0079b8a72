"""Pieces both training loops share: the accelerator, a data order that a resumed run can re-enter mid-epoch,
per-step random generators, the optimiser and the LR schedule, and handing freed memory back to the OS.

Exact resume by construction: the data order of epoch e is a permutation drawn from (seed, e), and every random
draw of step s (timesteps, noise, caption dropout, latent sampling) comes from a generator seeded by
(seed, s, process). The data augmentation (random crop, flip) of the sample at slot k of epoch e is drawn from a
generator seeded by the k-th of n seeds that epoch's (seed, e) generator draws after the permutation: the slot
fixes the step, the process and the place in the batch, so this is the per-step scheme keyed by data position
(`epoch_order`). With aspect-ratio buckets the same generator also draws the order of the epoch's batches. A resumed run therefore needs only (step, epoch, batch-in-epoch) besides the weights and
optimiser state that accelerate saves; no global RNG state has to round-trip.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, values) and, for an autoencoder, its latent scale and shift:
    what a run took from disk, so a resumed run can tell that the files behind the same path were replaced. The
    library versions in the module's config are left out: upgrading transformers between two sessions must not
    stop a resume."""
    import hashlib

    h = hashlib.sha256()
    config = getattr(module, "config", None)
    h.update(repr([getattr(config, k, None) for k in ("scaling_factor", "shift_factor")]).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def rows_sha256(dataset: Any) -> str:
    """sha256 of a training split's rows: captions, and each image's bytes or its path, size and modification time
    (as the latent cache keys them): a resume can tell that images were added, removed or replaced."""
    import hashlib

    from .latent_cache import hash_rows

    h = hashlib.sha256()
    hash_rows(h, dataset, fingerprint=False)  # a `datasets` upgrade between two sessions is not a data change
    return h.hexdigest()


# What marks a folder as holding a model: a pipeline, a component, or a single-file checkpoint
MODEL_MARKERS = ("model_index.json", "*.safetensors", "*.ckpt", "*.bin", "*/config.json")


def check_output_dir(output_dir: str, sources: Mapping[str, str | None], data_dir: str | None = None) -> None:
    """Before the run folder is locked or written: `--output_dir` is none of the folders the run loads weights from
    (`sources`, flag -> path) nor holds one, and holds no model that a run of ours did not make (no
    run_config.json beside it: a folder from `save_pretrained`, a download). The run's final export writes unet/,
    vae/, model_index.json... into it, over whatever is there. Nor is it inside the training data folder
    `data_dir`: the data reader takes every image under it, so the run's validation grids would join the data of
    the next run, or of this one resumed (which then refuses: its data changed)."""
    from ..checkpointing import RUN_CONFIG_FILE
    from ..errors import UserError

    out = Path(output_dir)
    if data_dir and Path(data_dir).is_dir():
        data, dest = Path(data_dir).resolve(), out.resolve()
        if dest == data or data in dest.parents:
            raise UserError(f"--output_dir {output_dir!r} is inside --train_data_dir {data_dir!r}: the run's images "
                            "would be read as training data; choose an --output_dir outside the data folder")
    if not out.is_dir():
        return
    for flag, source in sources.items():
        if source and Path(source).exists():
            src, dest = Path(source).resolve(), out.resolve()
            if src == dest or dest in src.parents:
                where = "is" if src == dest else "holds"
                raise UserError(f"--output_dir {output_dir!r} {where} {flag} {source!r}: the run would write over the "
                                "weights it starts from; choose another --output_dir")  # fmt: skip
    if not (out / RUN_CONFIG_FILE).exists():
        found = next((f.relative_to(out) for pattern in MODEL_MARKERS for f in sorted(out.glob(pattern))), None)
        if found is not None:
            raise UserError(f"--output_dir {output_dir!r} holds a model ({found}) that no training run made (no "
                            f"{RUN_CONFIG_FILE}): the run would write over it; choose another --output_dir")  # fmt: skip


def open_run_folder(output_dir: str, run_config: dict[str, Any], resume: str | None,
                    may_differ: tuple[str, ...]) -> tuple[Path, Path | None]:
    """Check the output folder before any work: (folder, checkpoint to resume from or None)."""
    from ..checkpointing import check_run_folder, resolve_resume
    from ..errors import UserError

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {str(out)!r} is a file, not a folder")
    checkpoint = resolve_resume(out, resume)
    check_run_folder(out, run_config, resuming=checkpoint is not None, may_differ=may_differ, checkpoint=checkpoint)
    return out, checkpoint


def launched_processes() -> int:
    """The number of training processes the launcher started (torchrun / accelerate launch set WORLD_SIZE), known
    before the accelerator exists, so checks that depend on it can run before the output folder is touched."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


REPORT_TO = ("tensorboard", "wandb", "all", "none")


def check_report_to(report_to: str) -> None:
    """`--report_to`: refuse a tracker that is not installed, before any work (accelerate would drop it with only
    a debug message, and the run would log nowhere)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    from ..errors import UserError

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to in available and not available[report_to]():
        raise UserError(f"--report_to {report_to} needs the {report_to} package, which is not installed: "
                        f"pip install {report_to}, or pass --report_to tensorboard|none")


@dataclass(frozen=True)
class Machine:
    """What a launch can use: a test describes any machine with this."""

    cuda: bool
    gpus: int
    gpu_bf16: bool  # the GPU supports bf16 (False without a GPU)
    cores: int  # CPU cores this process may run on

    @classmethod
    def here(cls) -> Machine:
        cuda = torch.cuda.is_available()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cls(cuda, torch.cuda.device_count() if cuda else 0, cuda and torch.cuda.is_bf16_supported(), cores)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return max(int(env.get(name, default)), 1)
    except ValueError:
        return default


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def check_launch(precision: str, cpu: bool, env: Mapping[str, str], machine: Machine) -> tuple[str, bool, list[str]]:
    """Fit the launch to the machine: (mixed precision to give accelerate, run on the CPU, one warning line per
    mismatch). `precision` is train.mixed_precision, `cpu` the --cpu flag, `env` what the launcher set
    (accelerate launch: ACCELERATE_*, torchrun / accelerate launch: WORLD_SIZE, LOCAL_WORLD_SIZE).

    Why by hand: accelerate adapts silently. `accelerate launch --config_file configs/accelerate/ddp.yaml` on a
    2-core machine without a GPU started 8 CPU processes; the launch config's bf16 gave way to our explicit
    mixed_precision; fp16 on the CPU is accepted and trains in fp32 (accelerate turns autocast off)."""
    world = _env_int(env, "WORLD_SIZE", 1)
    local = _env_int(env, "LOCAL_WORLD_SIZE", world)
    forced_cpu = cpu or _env_flag(env, "ACCELERATE_USE_CPU")
    on_cpu = forced_cpu or not machine.cuda
    warnings = []
    if not machine.cuda and not forced_cpu:
        asked = []
        if "ACCELERATE_MIXED_PRECISION" in env and world > 1:  # accelerate launch's multi-GPU launcher
            asked.append(f"accelerate launch of {world} processes without --cpu")
        # accelerate shards only from its GPU modes: on the CPU an FSDP config trains as plain DDP (full weights
        # in every process, full checkpoints), measured with accelerate 1.16 (docs/training.md)
        asked += [f"{name} (which on the CPU runs as plain DDP, no sharding)" for name, var in
                  (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")) if _env_flag(env, var)]
        if env.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
            asked.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
        if asked:
            warnings.append(f"GPU launch without a GPU: {', '.join(asked)}, but torch sees no CUDA device, so "
                            "training runs on the CPU")
    if on_cpu and local > machine.cores:
        warnings.append(f"more processes than CPU cores: {local} training processes on {machine.cores} core(s) "
                        f"compete for them; start at most {machine.cores} (torchrun --nproc_per_node {machine.cores})")
    elif not on_cpu and local > machine.gpus:
        warnings.append(f"more processes than GPUs: {local} training processes on {machine.gpus} GPU(s); start "
                        f"at most {machine.gpus} (accelerate launch --num_processes {machine.gpus})")

    def unusable(p: str) -> str | None:
        if p == "fp16" and on_cpu:
            return "fp16 needs a GPU (on the CPU accelerate turns autocast off)"
        if p == "bf16" and not on_cpu and not machine.gpu_bf16:
            return "this GPU does not support bf16"
        return None

    launcher = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("fp16", "bf16") and precision == "no":
        why = unusable(launcher)
        warnings.append(f"mixed precision: the accelerate launch config asks for {launcher}, but "
                        "train.mixed_precision is 'no', which wins, so precision is 'no'"
                        + (f" ({why})" if why else f": pass --mixed_precision {launcher} to use it"))
    why = unusable(precision)
    if why:
        alternative = "; bf16 works on the CPU" if precision == "fp16" else "; fp16 works on it"
        warnings.append(f"mixed precision {precision} is not available: {why}, so precision is 'no'{alternative}")
        precision = "no"
    return precision, on_cpu, warnings


def check_launchable(cpu: bool, env: Mapping[str, str] | None = None, machine: Machine | None = None) -> None:
    """Before the run folder is touched: refuse a launch that torch would stop at its first step, in its own
    traceback. FSDP (version 1) with fsdp_sync_module_states, configs/accelerate/fsdp.yaml's setting, started on
    a machine without a GPU: "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu"
    (docs/training.md; on the CPU accelerate would run it as plain DDP anyway)."""
    from ..errors import UserError

    env = os.environ if env is None else env
    machine = machine or Machine.here()
    fsdp1 = _env_flag(env, "ACCELERATE_USE_FSDP") and env.get("FSDP_VERSION", "1").strip() == "1"
    if (not machine.cuda and not cpu and not _env_flag(env, "ACCELERATE_USE_CPU") and fsdp1
            and _env_flag(env, "FSDP_SYNC_MODULE_STATES") and _env_int(env, "WORLD_SIZE", 1) > 1):
        raise UserError("an FSDP launch with fsdp_sync_module_states needs GPUs (torch refuses it on the CPU), and "
                        "this machine has none: on CPUs train with DDP, torchrun --nproc_per_node N SCRIPT ...")


@contextlib.contextmanager
def sigterm_ends_the_rendezvous() -> Iterator[None]:
    """SIGTERM at its default (the process ends at once) while a process of a multi-process launch waits in C
    code for its peers to join the process group. Our SIGTERM handler (ldm_app.errors.run_cli) is Python, which
    runs only when that wait returns: when rank 0 stops before joining (its run folder in use by another run, say),
    torchrun SIGTERMs the waiting workers, and they sat out its 30 s grace until it SIGKILLed them. No file is
    being written during the wait (the run config comes after it), so there is nothing to clean up."""
    import signal
    import threading

    if launched_processes() <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_accelerator(cfg: TrainConfig, output_dir: str | Path, cpu: bool = False, report_to: str = "tensorboard",
                     machine: Machine | None = None):
    """accelerate owns device placement, mixed precision, distribution and gradient accumulation; `check_launch`
    first fits the launch to the machine (one warning line per mismatch, main process). Processes started by
    torchrun on a machine without CUDA get a gloo process group: accelerate builds one only when told to use the
    CPU. `report_to`: one of REPORT_TO (accelerate's trackers; "all" = every installed one)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision, on_cpu, warnings = check_launch(cfg.mixed_precision, cpu, os.environ, machine or Machine.here())
    cpu = cpu or (on_cpu and launched_processes() > 1)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs"))
    with sigterm_ends_the_rendezvous():
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=None if report_to == "none" else report_to,
            project_config=project,
            cpu=cpu,
        )
    fill_deepspeed_batch(accelerator.state, cfg.train_batch_size)
    if accelerator.is_main_process:
        for line in warnings:
            logger.warning(line)
    return accelerator


def fill_deepspeed_batch(state: Any, train_batch_size: int) -> None:
    """DeepSpeed needs its micro-batch size when the engine is built. accelerate reads an "auto" value from the
    DataLoader given to `prepare`, and our trainers give none (they iterate their own data order), so prepare would
    fail with "requires you to pass at least one of training or evaluation dataloaders": fill it in from the run
    config, as accelerate's docs say to do without a DataLoader. A value the DeepSpeed config sets is kept."""
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = train_batch_size


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar for every text encoder it saves: off while a checkpoint
    or pipeline is written, so it does not cut through the training bar."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def log_image(accelerator: Any, name: str, image: Any, step: int) -> None:
    """A PIL image to every tracker that takes images (TensorBoard, W&B), main process."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step)


class TrainProgress:
    """The training loops' progress bar over optimisation steps, on the main process: tqdm's ETA and step rate,
    plus the loop's figures (loss, ...) and images per second. While it is open, log lines go through
    tqdm.write (tqdm's logging_redirect_tqdm), so they do not break the bar. Written to a file rather than a
    terminal, it refreshes every 30 s instead of 10 times a second (a long run's log stays readable)."""

    def __init__(self, desc: str, total: int, initial: int, images_per_step: int, enabled: bool):
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                        mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive)
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> TrainProgress:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # only when the log goes to the console (setup_logging); under pytest the root logger has no such handler
        console = any(type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
                      for h in logging.root.handlers)
        if console and not self.bar.disable:
            self._redirect.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()  # ends the bar's line, so an error message starts a line of its own
        self._redirect.close()

    def update(self, figures: Callable[[], dict[str, float]]) -> None:
        """One optimisation step done. `figures` is called only when the bar is about to be redrawn: reading a
        loss off the GPU waits for the step to finish."""
        bar = self.bar
        if bar.disable:
            return
        if bar._time() - bar.last_print_t >= bar.mininterval or bar.n + 1 >= bar.total:
            postfix = {k: f"{v:.4g}" for k, v in figures().items()}
            # steps/s: tqdm's smoothed estimate, or (before tqdm has one: a log file refreshes every 30 s) the
            # mean since the bar opened
            elapsed = bar._time() - bar.start_t
            rate = bar.format_dict.get("rate") or ((bar.n - bar.initial) / elapsed if elapsed > 0 else None)
            if rate:
                postfix["img/s"] = f"{rate * self.images_per_step:.1f}"
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)


def step_generator(seed: int, step: int, process_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one optimisation step on one process (see module docstring)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 1_009 + process_index) % (2**63 - 1))
    return g


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 10_007 + epoch)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=_epoch_generator(seed, epoch)).tolist()


def epoch_order(n: int, seed: int, epoch: int, batch_size: int,
                bucket_ids: list[int] | None = None) -> list[tuple[int, int]]:
    """Epoch `epoch`'s samples as (row, sample seed), all drawn from the (seed, epoch) generator: first the
    permutation of the rows (`epoch_permutation`, unchanged), then one 62-bit seed per slot of the epoch (the
    seed of that sample's augmentation generator, see ImageCaptionDataset).

    Without buckets the rows are in permutation order (batches are consecutive runs of `batch_size`, the last
    partial one dropped by the loader). With `bucket_ids` (each row's bucket): each bucket's rows, in
    permutation order, are cut into full batches (a bucket's remainder sits out this epoch), then the batches are
    shuffled by a third draw of the same generator; the result is a whole number of batches, each of one bucket,
    so the loader's consecutive runs of `batch_size` (and accelerate's sharding of whole batches) keep every
    batch inside one bucket."""
    g = _epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g).tolist()
    seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
    if bucket_ids is not None:
        groups: dict[int, list[int]] = {}
        for row in order:
            groups.setdefault(bucket_ids[row], []).append(row)
        chunks = [rows[i:i + batch_size] for _, rows in sorted(groups.items())
                  for i in range(0, len(rows) - batch_size + 1, batch_size)]
        order = [row for j in torch.randperm(len(chunks), generator=g).tolist() for row in chunks[j]]
    return list(zip(order, seeds))


def bucket_batches_per_epoch(bucket_ids: list[int], batch_size: int, num_processes: int) -> int:
    """Batches each process gets per epoch with buckets: full batches of every bucket, shared over processes."""
    counts: dict[int, int] = {}
    for b in bucket_ids:
        counts[b] = counts.get(b, 0) + 1
    return sum(c // batch_size for c in counts.values()) // num_processes


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
    `start` (mid-epoch on resume: the first `start.batch` batches of that epoch are skipped, not replayed).
    A dataset with `takes_sample_seeds` gets (row, sample seed) items (see `epoch_order`), others row indices; one
    with `bucket_ids` (not None) gets single-bucket batches."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    epoch, skip = start.epoch, start.batch
    seeded, bucket_ids = getattr(dataset, "takes_sample_seeds", False), getattr(dataset, "bucket_ids", None)
    while True:
        order = epoch_order(len(dataset), seed, epoch, batch_size, bucket_ids)
        order = order if seeded else [row for row, _ in order]
        if not order:
            from ..errors import UserError

            raise UserError(f"no bucket holds a full batch of {batch_size} images: lower train.train_batch_size, "
                            "add images, or turn data.buckets off")
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
