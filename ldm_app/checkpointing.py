"""Training checkpoints shared by train_vae.py and train_ldm.py.

accelerate's `save_state` / `load_state` hold the state (models, optimisers, LR schedulers, every RNG, and the
GradScaler); this module adds what accelerate leaves to the caller:
- atomic writes: all processes write into `.checkpoint-N.tmp`, the main process renames it to `checkpoint-N`
  only when every file is on disk, so a SIGKILL leaves either the old set or the new one, never half of one;
- `training_state.json` (step, epoch, batch position) so a resumed run continues mid-epoch;
- `latest` resolution that skips a corrupt newest checkpoint (with a warning) for the one before it;
- keeping the last K checkpoints;
- a run-folder identity check, so resuming into a folder that holds a different run is refused;
- a run-folder lock (`lock_run_folder`), so two trainers never write into one folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .config import diff_configs, with_legacy_values
from .errors import UserError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
RUN_CONFIG_FILE = "run_config.json"
# run_config.json's record of the weights a run took from disk ({name: sha256}; training.common.weights_sha256)
LOADED_WEIGHTS = "loaded_weights_sha256"
# ... and of its training rows (captions, files with their sizes and times; training.common.rows_sha256)
TRAINING_ROWS = "training_rows_sha256"
LOCK_FILE = ".lock"
PROCESSES = "num_processes"  # training_state.json: how many processes saved it


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def _is_checkpoint_name(path: Path) -> bool:
    return path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (renamed into place), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _is_checkpoint_name(p)]
    return sorted(found, key=checkpoint_step)


def check_checkpoint(path: Path) -> str | None:
    """None when `path` looks loadable, else the reason it does not (cheap: reads headers, not tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{STATE_FILE} unreadable ({e.__class__.__name__})"
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except (SafetensorError, OSError) as e:
            return f"{f.relative_to(path)} is corrupt ({str(e).splitlines()[0][:80]})"
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.stat().st_size == 0:
            return f"{f.relative_to(path)} is empty"
        if f.suffix in (".bin", ".pkl") and not _zip_ok(f):  # torch.save files are zip archives
            return f"{f.relative_to(path)} is truncated or corrupt"
    return None


def _zip_ok(f: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(f) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    """`spec` is None (fresh run), "latest", or a checkpoint path. "latest" with none found logs and returns None;
    a corrupt newest checkpoint falls back to the previous one with a warning; an explicit bad path is an error."""
    if not spec:
        return None
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {spec!r}: no such checkpoint folder (or pass 'latest')")
        problem = check_checkpoint(path)
        if problem:
            raise UserError(f"checkpoint {spec!r} cannot be resumed: {problem}")
        step = checkpoint_step(path) if _is_checkpoint_name(path) else None
        newer = [c.name for c in list_checkpoints(output_dir) if step is not None and checkpoint_step(c) > step]
        if newer:  # their steps would be written again on another timeline, and `latest` would go back to them
            raise UserError(f"--resume_from_checkpoint {spec!r} is older than {', '.join(newer[:3])} in "
                            f"{str(output_dir)!r}: resuming from it would fork the run; move the newer checkpoints "
                            "out of the folder first, or resume into a new --output_dir")  # fmt: skip
        return path
    checkpoints = list_checkpoints(output_dir)
    for path in reversed(checkpoints):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is corrupt (%s); falling back to the previous one", path.name, problem)
    if checkpoints:
        raise UserError(f"every checkpoint in {str(output_dir)!r} is corrupt; cannot resume (remove them to start fresh)")
    logger.warning("no checkpoint in %s to resume from: starting a fresh run", output_dir)
    return None


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    state: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Collective: every process must call it. `state` is the JSON training position (step, epoch, batch);
    `write_extra(folder)` runs on the main process to add files (EMA weights, a loadable pipeline...).

    A failed write (a full disk, a read-only folder: any process) ends the same way on every process: the
    temporary folder is removed, earlier checkpoints are untouched, and every process raises a one-line
    UserError naming the path (other exceptions keep their traceback, after the same clean-up). Each phase ends
    with an all-process vote instead of a bare barrier, so a process whose write failed never leaves the others
    waiting at the next collective."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed run
        tmp.mkdir(parents=True)

    def finish() -> None:
        if write_extra is not None:
            write_extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({**state, PROCESSES: accelerator.num_processes}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)

    _checkpoint_phase(accelerator, tmp, final, make_tmp if accelerator.is_main_process else None)
    _checkpoint_phase(accelerator, tmp, final, lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    _checkpoint_phase(accelerator, tmp, final, finish if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, upto=step)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_phase(accelerator: Any, tmp: Path, final: Path, work: Callable[[], None] | None) -> None:
    """Run `work` (None: nothing on this process), then agree with every process on whether all succeeded; on a
    failure anywhere, the main process removes `tmp` and every process raises."""
    error: BaseException | None = None
    if work is not None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - re-raised below, after every process knows
            error = e
    if _failed_anywhere(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise UserError(f"cannot write {final}: the write failed on another process (see its error)")
        user = _as_write_error(error, final)
        if user is not None:
            raise user from None
        raise error


def _failed_anywhere(accelerator: Any, failed: bool) -> bool:
    if accelerator.num_processes == 1:
        return failed
    import torch

    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def _as_write_error(error: BaseException, dest: Path) -> UserError | None:
    """A full disk / read-only / forbidden write as one UserError line naming `dest`, else None (a bug)."""
    from .fileio import write_problem

    if isinstance(error, UserError):
        return error
    problem = write_problem(error)
    return UserError(f"cannot write {dest}: {problem}") if problem else None


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore accelerate's state from `path` and return its training position. A checkpoint of another number of
    processes is refused: the LR scheduler's count and the data position are per process (accelerate steps the
    scheduler once per process), so the run would go on, with no word, on another schedule and other data."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.pop(PROCESSES, None)  # absent in checkpoints from before it was recorded
    if saved is not None and saved != accelerator.num_processes:
        raise UserError(f"checkpoint {str(path)!r} was saved by a run of {saved} process(es), this one has "
                        f"{accelerator.num_processes}: resume it with {saved} (torchrun --nproc_per_node {saved}, or "
                        f"accelerate launch --num_processes {saved}), or the run would not go on where it stopped")
    accelerator.load_state(str(path))
    return state


def prune_checkpoints(output_dir: Path, total_limit: int | None, upto: int | None = None) -> None:
    """Keep the newest `total_limit` checkpoints of steps <= `upto` (the one just saved). A newer one is a corrupt
    checkpoint that `latest` fell back from: counting it would prune the good ones below it; its step's next save
    replaces it."""
    if total_limit is None:
        return
    done = [c for c in list_checkpoints(output_dir) if upto is None or checkpoint_step(c) <= upto]
    for old in done[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def _read_run_config(saved_file: Path, what: str) -> dict[str, Any]:
    try:
        return with_legacy_values(json.loads(saved_file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise UserError(f"{saved_file} is unreadable ({e.__class__.__name__}): cannot tell which run {what}; "
                        "use a new --output_dir") from None


def _changed_keys(saved: Mapping[str, Any], run_config: Mapping[str, Any], may_differ: tuple[str, ...]) -> list[str]:
    current = with_legacy_values({k: v for k, v in run_config.items() if k not in (LOADED_WEIGHTS, TRAINING_ROWS)})
    saved = {k: v for k, v in saved.items() if k not in (LOADED_WEIGHTS, TRAINING_ROWS)}
    return [k for k in diff_configs(saved, current) if not k.startswith(may_differ)]


def check_run_folder(output_dir: str | Path, run_config: Mapping[str, Any], resuming: bool,
                     may_differ: tuple[str, ...] = (), checkpoint: Path | None = None) -> None:
    """Refuse to mix runs in one folder: an output dir with checkpoints must be resumed (not silently restarted
    and overwritten), and only with the config it was made with (keys in `may_differ`, such as the step budget,
    can change on resume). A `checkpoint` of another folder must come from a run of the same config (its folder's
    run_config.json): another run's state would fail to load in a traceback, or load and go on silently."""
    output_dir = Path(output_dir)
    saved_file = output_dir / RUN_CONFIG_FILE
    has_work = bool(list_checkpoints(output_dir))
    if has_work and not resuming:
        raise UserError(
            f"output dir {str(output_dir)!r} already holds checkpoints of a run; pass --resume_from_checkpoint latest "
            "to continue it, or choose a new --output_dir"
        )
    if checkpoint is not None and checkpoint.parent.resolve() != output_dir.resolve():
        source = checkpoint.parent / RUN_CONFIG_FILE
        if not source.is_file():
            raise UserError(f"--resume_from_checkpoint {str(checkpoint)!r}: its folder has no {RUN_CONFIG_FILE}, so "
                            "which run it belongs to is unknown; give a checkpoint of a run folder")  # fmt: skip
        changed = _changed_keys(_read_run_config(source, "the checkpoint belongs to"), run_config, may_differ)
        if changed:
            raise UserError(f"--resume_from_checkpoint {str(checkpoint)!r} is of a different run (config differs at "
                            f"{', '.join(changed[:3])}); resume it with its own config")  # fmt: skip
    if saved_file.is_file():
        saved = _read_run_config(saved_file, "the folder holds")
        saved_weights, weights = saved.pop(LOADED_WEIGHTS, None), run_config.get(LOADED_WEIGHTS)
        saved_rows, rows = saved.pop(TRAINING_ROWS, None), run_config.get(TRAINING_ROWS)
        changed = _changed_keys(saved, run_config, may_differ)
        if changed:
            raise UserError(
                f"output dir {str(output_dir)!r} holds a different run (config differs at {', '.join(changed[:3])}); "
                "use a new --output_dir"
            )
        # The same paths, other files behind them (a model folder overwritten, a hub name now at a new revision): a
        # resume would go on training on other latents or other frozen weights with no word. Runs saved before this
        # record existed have none and resume as before.
        if isinstance(saved_weights, dict) and isinstance(weights, Mapping):
            other = [name for name, digest in weights.items() if saved_weights.get(name, digest) != digest]
            if other:
                raise UserError(
                    f"output dir {str(output_dir)!r} holds a run that started from other {' and '.join(other)} weights "
                    f"than the ones given now (sha256 {str(saved_weights[other[0]])[:12]} then, {weights[other[0]][:12]} "
                    "now): resume with the files it started from, or use a new --output_dir"
                )
        # Added, removed or replaced images: training can go on (people add data to a run), but the data order is
        # drawn over the rows, so the run is no longer the one an uninterrupted run would have been: say so.
        if resuming and saved_rows and rows and saved_rows != rows and int(os.environ.get("RANK", "0")) == 0:
            logger.warning("the training data changed since this run started (images or captions added, removed or "
                           "replaced): the resumed run goes on, but it is no longer exactly an uninterrupted run")


def write_run_config(output_dir: str | Path, run_config: Mapping[str, Any]) -> None:
    from .fileio import atomic_write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / RUN_CONFIG_FILE, json.dumps(dict(run_config), indent=2))


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def lock_run_folder(output_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` (fcntl.flock on OUT/.lock, which holds the owner's pid) while the
    body runs; a second trainer on the same folder gets a one-line UserError naming it.

    Only the process of global rank 0 (env RANK, unset for a single process) locks: it alone writes the run
    folder, and it locks before any collective, so a refused multi-process run stops with its launcher (torchrun
    stops the other workers when one exits). The kernel releases the lock when the process dies, so a killed
    run never leaves a stale lock; the lock file itself stays (removing it would let two runs lock two different
    files of one name). A file system without locks (some network mounts) gets a warning, not a refusal."""
    import fcntl

    from .fileio import write_errors

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {str(out)!r} is a file, not a folder")
    path = out / LOCK_FILE
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise UserError(f"output dir {str(out)!r} is in use by another run"
                            f"{f' (process {holder})' if holder.isdigit() else ''}: wait for it to end, or choose "
                            "another --output_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("cannot lock %s (%s): nothing stops a second run from writing into this folder", out,
                           e.strerror)
        else:
            with write_errors(path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
