"""GPU check (issue #20, part 5): one table of generation and training figures on one GPU, in <= 8 minutes.

    python benchmarks/gpu_check.py --json /tmp/gpu_check.json      # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --smoke                         # tiny sizes on the CPU: checks the plumbing

Rows (docs/gpu_check.md says what each measures and how to run this on a lent GPU):
- generation, seconds per image: an SD-1.5-sized model (U-Net, autoencoder and CLIP text encoder built from
  ldm_app/assets/sd15_configs with random weights: speed does not depend on the weights) at 512 px, 20 DPM-Solver++
  steps, guidance 7.5, batch 1 and 4, fp32 / fp16 / bf16 with PyTorch SDPA attention; fp16 with xformers; fp16
  with the U-Net under torch.compile (the compile time is a row of its own); the bundled model at its own settings;
- training, images per second and peak GPU memory: train_ldm's own entry point (ldm_app.training.ldm.main, what
  train_ldm.py runs) fine-tuning the SD-1.5-sized random pipeline on 512 px shapes (python -m ldm_app.data.shapes)
  with cached vs encoded latents and full vs LoRA; then the same full fine-tuning launched by `accelerate launch`
  with configs/accelerate/fsdp.yaml and configs/accelerate/deepspeed.yaml on one process (pass/fail + img/s).

Robustness is the point of the layout: this process imports nothing heavy; each group of rows runs in a worker
subprocess (this file with --worker) under its own timeout, and writes each row as a JSON line the moment it is
done. A row that cannot run says why ("skipped: xformers not installed", "failed: ...") and the table still comes
out; a group that crashes or runs out of time marks only its unfinished rows. The whole run respects --budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle in the center on a white background"


# --------------------------------------------------------------------------------------------------------------
# Sizes and rows


@dataclass(frozen=True)
class Sizes:
    tiny: bool  # the SD-1.5 configs shrunk to a few thousand parameters (smoke)
    resolution: int  # generation, pixels
    steps: int  # generation sampling steps
    batches: tuple[int, int]
    timed_runs: int  # timed generation calls after one warm-up call
    default_steps: int | None  # the bundled model's sampling steps (None: its own, from ldm_app.json)
    train_resolution: int
    train_batch: int
    train_steps: int  # optimisation steps; img/s is read off the last log window of train.log_every steps
    log_every: int
    train_images: int
    lora_rank: int
    workers: int  # DataLoader workers for the encoded-latents row


FULL = Sizes(tiny=False, resolution=512, steps=20, batches=(1, 4), timed_runs=2, default_steps=None,
             train_resolution=512, train_batch=8, train_steps=10, log_every=5, train_images=64, lora_rank=16,
             workers=4)
SMOKE = Sizes(tiny=True, resolution=64, steps=2, batches=(1, 4), timed_runs=1, default_steps=2,
              train_resolution=64, train_batch=2, train_steps=4, log_every=2, train_images=8, lora_rank=4, workers=0)


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # the worker process that runs it
    what: str
    cuda_only: bool
    est_s: int  # estimated GPU seconds (from sizes, not measured; docs/gpu_check.md)

    @property
    def cap_s(self) -> int:
        """A row's own time limit: generous against the estimate (the first H200 run, 2026-12-04, stayed well inside it)."""
        return max(4 * self.est_s, 60)


def rows(s: Sizes = FULL) -> list[Row]:
    """Every row of the table, in order; the same names whatever the sizes (the "what" text gives them)."""
    gen = f"{s.resolution} px, {s.steps} steps DPM-Solver++, CFG 7.5"
    train = f"{s.train_resolution} px, batch {s.train_batch}, {'no mixed precision' if s.tiny else 'bf16'}"
    model = "SD-1.5 configs shrunk (--smoke)" if s.tiny else "SD-1.5-size"
    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        for b in s.batches:
            out.append(Row(f"gen_sd15_{dtype}_b{b}", "gen", f"{model}, {gen}, batch {b}, {dtype}, SDPA",
                           dtype != "fp32", {1: 2, 4: 6}[b] * (3 if dtype == "fp32" else 1)))
    for b in s.batches:
        out.append(Row(f"gen_sd15_fp16_b{b}_diffusers", "gen", f"as gen_sd15_fp16_b{b}, diffusers' "
                       "StableDiffusionPipeline on the same modules and scheduler", True, {1: 2, 4: 6}[b]))
    for b in s.batches:
        out.append(Row(f"gen_sd15_fp16_b{b}_xformers", "gen", f"as gen_sd15_fp16_b{b}, xformers attention", True,
                       {1: 2, 4: 6}[b]))
    steps = "its own steps" if s.default_steps is None else f"{s.default_steps} steps"
    for dtype in ("fp32", "fp16", "bf16"):
        for b in s.batches:
            out.append(Row(f"gen_default_{dtype}_b{b}", "gen",
                           f"bundled model, 64 px, {steps}, its guidance, batch {b}, {dtype}",
                           dtype != "fp32", 2))
    out += [
        Row("train_full_cached", "train", f"train_ldm, {model} full fine-tune, {train}, cached latents", False, 35),
        Row("train_full_uncached", "train", "as train_full_cached, latents encoded each step", False, 25),
        Row("train_lora_cached", "train", f"as train_full_cached, LoRA rank {s.lora_rank} (U-Net attention)", False,
            20),
        Row("train_fsdp_full_cached", "fsdp", "as train_full_cached, accelerate launch fsdp.yaml, 1 process, "
            "checkpoint + export included", True, 90),
        Row("train_deepspeed_full_cached", "deepspeed", "as train_full_cached, accelerate launch deepspeed.yaml "
            "(ZeRO-2), 1 process, checkpoint + export included", True, 90),
        # the compiled row's first call compiles (inductor, default mode: about 1-2 minutes for this U-Net)
        Row("gen_sd15_fp16_b1_compiled", "compile", "as gen_sd15_fp16_b1, U-Net under torch.compile", True, 110),
        Row("compile_sd15_fp16_b1", "compile", "torch.compile time: first call minus a compiled call", True, 0),
    ]
    return out


# Order of the worker processes: the cheap, most-asked figures first, torch.compile (minutes, may not finish) last.
GROUP_ORDER = ("gen", "train", "fsdp", "deepspeed", "compile")
LAUNCH_NEEDS = {"deepspeed": "deepspeed"}  # group -> package its launcher needs
GROUP_BUDGET_S = {"gen": 120, "train": 150, "fsdp": 110, "deepspeed": 110, "compile": 180}


# --------------------------------------------------------------------------------------------------------------
# Worker side: the measurements (heavy imports only here)


def sd15_components(device: Any, tiny: bool = False, resolution: int = 512) -> dict[str, Any]:
    """An SD-1.5-sized model (U-Net, autoencoder, CLIP text encoder from ldm_app/assets/sd15_configs, random weights:
    speed does not depend on them), DPM-Solver++, built on `device`; tiny: the same configs shrunk (--smoke).
    Also used by bench_generate.py --model sd15."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_app.models import load_tokenizer
    from ldm_app.samplers import make_scheduler
    from ldm_app.single_file import SD15_CONFIGS

    unet_cfg = dict(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))
    vae_cfg = dict(AutoencoderKL.load_config(SD15_CONFIGS / "vae"))
    te_cfg = CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder")
    sched_cfg = json.loads((SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    if tiny:
        unet_cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32,
                        sample_size=resolution // 8)
        vae_cfg.update(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=8,
                       sample_size=resolution)
        te_cfg.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           projection_dim=32))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(te_cfg)
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": load_tokenizer(), "unet": unet.eval(),
            "scheduler": make_scheduler("dpm++", sched_cfg)}


class RowTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM interrupts Python code of a row that runs past its share (the group's process timeout is the hard
    stop; this keeps the rows after it alive)."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise RowTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Worker:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.sizes = SMOKE if args.smoke else FULL
        self.smoke = args.smoke
        self.cuda = torch.cuda.is_available() and not args.smoke  # --smoke: CPU, fp32 only
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.results = Path(args.results)
        self.workdir = Path(args.workdir)
        self.deadline = args.deadline
        self.rows = {r.name: r for r in rows(self.sizes)}

    # ---- bookkeeping ---------------------------------------------------------------------------------------

    def emit(self, record: dict[str, Any]) -> None:
        with open(self.results, "a") as f:  # one line per row, written at once: a killed worker keeps its rows
            f.write(json.dumps(record) + "\n")

    def run_row(self, name: str, fn: Callable[[], dict[str, Any]], needs: str | None = None) -> dict[str, Any]:
        """Run one row: skipped without CUDA (if it needs it) or a package; else fn() under the row's time limit.
        fn returns {"value", "unit", "note"?}; any exception becomes a "failed: ..." row."""
        row, torch = self.rows[name], self.torch
        rec = {"name": name, "what": row.what}
        start = time.perf_counter()
        left = self.deadline - time.time()
        if row.cuda_only and not self.cuda:
            rec["status"] = "skipped: no CUDA"
        elif needs and importlib.util.find_spec(needs) is None:
            rec["status"] = f"skipped: {needs} not installed"
        elif left < 5:
            rec["status"] = "skipped: time budget spent"
        else:
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with time_limit(min(left - 2, row.cap_s)):
                    rec.update(fn())
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - a row's failure is a result, not the end of the table
                first = (str(e).strip().splitlines() or [""])[0][:200]
                rec["status"] = f"failed: {type(e).__name__}: {first}"
            if self.cuda:
                rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec["wall_s"] = round(time.perf_counter() - start, 1)
        self.emit(rec)
        print(f"[gpu_check] {name}: {rec['status']} {rec.get('value', '')} {rec.get('unit', '')}", flush=True)
        return rec

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def env(self) -> None:
        import importlib.metadata as md

        torch = self.torch
        versions = {}
        for pkg in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "datasets",
                    "xformers", "deepspeed"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
        device = torch.cuda.get_device_name(0) if self.cuda else f"cpu ({torch.get_num_threads()} threads)"
        self.emit({"env": {"device": device, "cuda": self.cuda, "smoke": self.smoke, "versions": versions}})

    # ---- models --------------------------------------------------------------------------------------------

    def sd15_pipeline(self, dtype: Any) -> Any:
        """An SD-1.5-sized LatentDiffusionPipeline with random weights, built on the device (initialising 1 G
        parameters on the CPU would take longer than the rows). Smoke: the same configs shrunk."""
        from ldm_app.pipeline import LatentDiffusionPipeline

        pipe = LatentDiffusionPipeline(**sd15_components(self.device, self.sizes.tiny, self.sizes.resolution))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device, dtype)

    def time_generation(self, pipe: Any, batch: int, **call: Any) -> dict[str, Any]:
        """Median seconds per image over timed_runs calls after one warm-up call (text encoding, sampling loop and
        decoding; output_type="pt" leaves out the PIL conversion, which is CPU work unrelated to the GPU)."""
        times = []
        for i in range(1 + self.sizes.timed_runs):
            self.sync()
            t0 = time.perf_counter()
            pipe([PROMPT] * batch, output_type="pt", generator=self.torch.Generator(self.device).manual_seed(i),
                 **call)
            self.sync()
            times.append(time.perf_counter() - t0)
        per_image = statistics.median(times[1:]) / batch
        return {"value": per_image, "unit": "s/image", "note": f"first call {times[0]:.2f} s",
                "first_call_s": times[0]}

    # ---- groups --------------------------------------------------------------------------------------------

    def group_gen(self) -> None:
        torch, s = self.torch, self.sizes
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        call = dict(height=s.resolution, width=s.resolution, num_inference_steps=s.steps, guidance_scale=7.5)
        holder: dict[str, Any] = {}

        def sd15(dtype: str) -> Any:  # one model, converted in place fp32 -> bf16 -> fp16 (no second build)
            if "pipe" not in holder:
                holder["pipe"] = self.sd15_pipeline(torch.float32)
            return holder["pipe"].to(dtype=dtypes[dtype])

        for dtype in ("fp32", "bf16", "fp16"):
            for b in s.batches:
                self.run_row(f"gen_sd15_{dtype}_b{b}", lambda: self.time_generation(sd15(dtype), b, **call))

        def xformers(b: int) -> dict[str, Any]:
            pipe = sd15("fp16")
            pipe.enable_xformers_memory_efficient_attention()  # stays on: the last rows of this model
            return self.time_generation(pipe, b, **call)

        def diffusers_pipe(b: int) -> dict[str, Any]:  # the speed-parity reference, on the GPU
            from diffusers import StableDiffusionPipeline

            ours = sd15("fp16")
            ref = StableDiffusionPipeline(**{k: ours.components[k] for k in ("vae", "text_encoder", "tokenizer",
                                          "unet", "scheduler")}, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            return self.time_generation(ref, b, **call)

        for b in s.batches:
            self.run_row(f"gen_sd15_fp16_b{b}_diffusers", lambda: diffusers_pipe(b))
        for b in s.batches:
            self.run_row(f"gen_sd15_fp16_b{b}_xformers", lambda: xformers(b), needs="xformers")
        holder.clear()

        def default(dtype: str) -> Any:
            if "default" not in holder:
                import ldm_app
                from ldm_app.pipeline import LatentDiffusionPipeline

                pipe = LatentDiffusionPipeline.from_pretrained(ldm_app.DEFAULT_MODEL)
                pipe.set_progress_bar_config(disable=True)
                holder["default"] = pipe.to(self.device)
            return holder["default"].to(dtype=dtypes[dtype])

        for dtype in ("fp32", "bf16", "fp16"):
            for b in s.batches:  # the model's own sampler, guidance and size (ldm_app.json)
                self.run_row(f"gen_default_{dtype}_b{b}",
                             lambda: self.time_generation(default(dtype), b, num_inference_steps=s.default_steps))

    def group_compile(self) -> None:
        torch, s = self.torch, self.sizes
        call = dict(height=s.resolution, width=s.resolution, num_inference_steps=s.steps, guidance_scale=7.5)
        got: dict[str, Any] = {}

        def compiled() -> dict[str, Any]:
            pipe = self.sd15_pipeline(torch.float16)
            pipe.unet = torch.compile(pipe.unet)  # default mode: the one users try first, and the fastest to build
            rec = self.time_generation(pipe, 1, **call)
            got["compile_s"] = rec["first_call_s"] - rec["value"]  # the first call compiles, then runs once
            return rec

        self.run_row("gen_sd15_fp16_b1_compiled", compiled)

        def compile_time() -> dict[str, Any]:
            if "compile_s" not in got:
                raise RuntimeError("the compiled row did not finish")
            return {"value": got["compile_s"], "unit": "s", "note": "cold cache (a fresh machine)"}

        self.run_row("compile_sd15_fp16_b1", compile_time)

    # ---- training ------------------------------------------------------------------------------------------

    def prepare_training(self) -> tuple[Path, Path]:
        """A random SD-1.5-sized pipeline folder (fp16 files: half the bytes to write and read; train_ldm loads
        float32) and a shapes dataset, once per work folder (the launched workers reuse them)."""
        from ldm_app.data.shapes import make_dataset

        s, torch = self.sizes, self.torch
        model, data = self.workdir / "sd15_random", self.workdir / f"shapes{s.train_resolution}"
        if not (model / "model_index.json").is_file():
            pipe = self.sd15_pipeline(torch.float16 if self.cuda else torch.float32)
            pipe.save_pretrained(self.workdir / "sd15_random.partial")
            os.replace(self.workdir / "sd15_random.partial", model)
            del pipe
        if not (data / "metadata.jsonl").is_file():
            make_dataset(data, s.train_images, s.train_resolution, seed=0)
        return model, data

    def train_args(self, model: Path, data: Path, out: Path, cached: bool, lora: bool) -> list[str]:
        """train_ldm.py's command line for a row: no EMA (FSDP and DeepSpeed refuse it; off everywhere to compare
        like with like), no tracker, no checkpoint before the end, every image trained (no hold-out)."""
        s = self.sizes
        argv = ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
                "--max_train_steps", str(s.train_steps), "--train_batch_size", str(s.train_batch),
                "--mixed_precision", "bf16" if self.cuda else "no", "--report_to", "none",
                "--set", f"data.resolution={s.train_resolution}", "--set", "data.holdout_fraction=0",
                "--set", "ldm.use_ema=false", "--set", f"train.log_every={s.log_every}",
                "--set", f"train.checkpointing_steps={10**6}", "--set", "train.checkpoints_total_limit=1",
                "--set", f"data.dataloader_num_workers={0 if cached else s.workers}"]
        if cached:
            argv += ["--cache_latents", "--cache_dir", str(out.parent / f"cache_{out.name}")]
        if lora:
            argv += ["--lora_rank", str(s.lora_rank)]
        if not self.cuda:
            argv.append("--cpu")
        return argv

    def train(self, argv: list[str], skip_saving: bool) -> dict[str, Any]:
        """One run of train_ldm's entry point; images/s from its last "step N/M ... X img/s" log line (the first
        window holds the warm-up). skip_saving: the final checkpoint and export are not run (for the SD-1.5 size,
        10 GB of weights and optimiser state whose writing would dwarf the steps and fill the disk)."""
        import logging
        import re

        from ldm_app.training import ldm

        speeds: list[float] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                m = re.match(r"step \d+/\d+ .* ([0-9.]+) img/s", record.getMessage())
                if m:
                    speeds.append(float(m.group(1)))

        handler = Grab(logging.INFO)
        logging.getLogger("train_ldm").addHandler(handler)
        saved = ldm.LDMTrainer.save, ldm.LDMTrainer.export_final
        if skip_saving:
            ldm.LDMTrainer.save = ldm.LDMTrainer.export_final = lambda self: None
        t0 = time.perf_counter()
        try:
            result = ldm.main(argv)
        finally:
            ldm.LDMTrainer.save, ldm.LDMTrainer.export_final = saved
            logging.getLogger("train_ldm").removeHandler(handler)
        wall = time.perf_counter() - t0
        if result.step != self.sizes.train_steps or not speeds:
            raise RuntimeError(f"trained {result.step} steps, {len(speeds)} throughput log lines")
        losses = [x for x in result.losses if math.isfinite(x)]
        return {"value": speeds[-1], "unit": "img/s", "run_s": wall,
                "note": f"first window {speeds[0]:.1f} img/s; run {wall:.0f} s"
                        + ("" if len(losses) == len(result.losses) else "; non-finite loss (random weights)")}

    def reset_accelerate(self) -> None:
        """In-process runs one after another: accelerate's state is a process-wide singleton (as in the tests)."""
        import gc

        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def group_train(self) -> None:
        # prepared before the rows, so that building the model is not in their peak memory; its failure is theirs
        try:
            files, failure = self.prepare_training(), None
        except Exception as e:  # noqa: BLE001
            files, failure = None, f"preparing the model and data failed: {type(e).__name__}: {e}"
        self.reset_accelerate()  # frees the build's GPU memory

        def row(name: str, cached: bool, lora: bool) -> dict[str, Any]:
            if failure:
                raise RuntimeError(failure)
            out = self.workdir / name
            try:
                return self.train(self.train_args(*files, out, cached, lora), skip_saving=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(self.workdir / f"cache_{name}", ignore_errors=True)
                self.reset_accelerate()

        self.run_row("train_full_cached", lambda: row("train_full_cached", True, False))
        self.run_row("train_full_uncached", lambda: row("train_full_uncached", False, False))
        self.run_row("train_lora_cached", lambda: row("train_lora_cached", True, True), needs="peft")

    def group_launched(self, name: str) -> None:
        """Inside `accelerate launch` (FSDP or DeepSpeed on one process): the real run, checkpoint and export
        included (gathering sharded weights is what these configs risk), its folder removed afterwards. The
        model and data are the train group's (prepared here only if that group did not get so far)."""
        def run() -> dict[str, Any]:
            model, data = self.prepare_training()
            out = self.workdir / name
            try:
                return self.train(self.train_args(model, data, out, cached=True, lora=False), skip_saving=False)
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(self.workdir / f"cache_{name}", ignore_errors=True)

        self.run_row(name, run, needs="deepspeed" if "deepspeed" in name else None)


def worker_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))  # a checkout need not be installed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = Worker(args)
    w.env()
    for group in args.worker.split(","):
        if group == "gen":
            w.group_gen()
        elif group == "train":
            w.group_train()
        elif group == "compile":
            w.group_compile()
        elif group in ("fsdp", "deepspeed"):
            w.group_launched(f"train_{group}_full_cached")
        else:
            raise SystemExit(f"unknown group {group!r}")


# --------------------------------------------------------------------------------------------------------------
# Orchestrator side (standard library only)


def group_command(group: str, argv_tail: list[str], accelerate: str) -> list[str]:
    """The worker's command: plain python, or for fsdp / deepspeed `accelerate launch` with the repo's config
    (its 8 processes overridden to 1: one lent GPU)."""
    me = [str(Path(__file__).resolve()), "--worker", group, *argv_tail]
    if group in ("fsdp", "deepspeed"):
        return [*accelerate.split(), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{group}.yaml"),
                "--num_processes", "1", "--num_machines", "1", *me]
    return [sys.executable, *me]


def run_group(cmd: list[str], timeout: float, log: Path) -> str | None:
    """Run one worker; None if it ended cleanly, else why not (for the rows it did not write)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher's children too, nothing else
            proc.wait()
            return f"group timed out after {timeout:.0f} s"
    if rc != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        return f"worker exited {rc}: {tail[0].strip()[:160]}"
    return None


def read_results(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    env, got = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "env" in rec:
                env = rec["env"]
            else:
                got[rec["name"]] = rec
    return env, got


def fmt_value(rec: dict[str, Any]) -> str:
    if rec.get("status") != "ok":
        return rec.get("status", "missing")
    v = rec["value"]
    return f"{v:.3g} {rec['unit']}" if v < 100 else f"{v:.0f} {rec['unit']}"


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| row | what | result | peak GPU GiB | wall s | note |", "|---|---|---|---|---|---|"]
    for r in records:
        peak = r.get("peak_gib")
        lines.append(f"| {r['name']} | {r['what']} | {fmt_value(r)} | {'' if peak is None else peak} | "
                     f"{r.get('wall_s', '')} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, fp32 only (tests the plumbing)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default 450)")
    p.add_argument("--json", help="also write the rows and the environment to this JSON file")
    p.add_argument("--groups", default=",".join(GROUP_ORDER), help="worker groups to run, comma-separated")
    p.add_argument("--workdir", help="scratch folder (default: a new temporary one, removed at the end)")
    p.add_argument("--accelerate", default=f"{sys.executable} -m accelerate.commands.accelerate_cli",
                   help="the launcher for the fsdp / deepspeed groups; 'launch' and its options are appended")
    p.add_argument("--list", action="store_true", help="print the rows with their estimated GPU seconds and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.list:
        print("| row | group | what | CUDA only | estimated GPU s | time limit s |\n|---|---|---|---|---|---|")
        for r in rows():
            print(f"| {r.name} | {r.group} | {r.what} | {'yes' if r.cuda_only else 'no'} | {r.est_s} | {r.cap_s} |")
        return 0

    start = time.time()
    deadline = start + args.budget
    selected = [g for g in args.groups.split(",") if g]
    unknown = set(selected) - set(GROUP_ORDER)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; expected some of {','.join(GROUP_ORDER)}")
    all_rows = rows(SMOKE if args.smoke else FULL)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results, log = workdir / "rows.jsonl", workdir / "workers.log"
    results.unlink(missing_ok=True)
    why: dict[str, str] = {}  # group -> why its unwritten rows are missing
    # --smoke: the groups whose every row needs CUDA are not started (their rows say so); the others share one
    # worker process (one import of torch/diffusers instead of several: the test stays short)
    groups = [g for g in GROUP_ORDER if g in selected]
    if args.smoke:
        groups = [g for g in groups if not all(r.cuda_only for r in all_rows if r.group == g)]
        batches = [",".join(groups)] if groups else []
    else:
        batches = groups
    for batch in batches:
        # accelerate's DeepSpeed launcher itself fails on a missing package: say so without launching it
        missing = [g for g in batch.split(",")
                   if g in LAUNCH_NEEDS and importlib.util.find_spec(LAUNCH_NEEDS[g]) is None]
        for g in missing:
            why[g] = f"skipped: {LAUNCH_NEEDS[g]} not installed"
        batch = ",".join(g for g in batch.split(",") if g not in missing)
        env = read_results(results)[0]
        if env and not env["cuda"]:  # known after the first worker: do not start workers that would only skip
            for g in batch.split(","):
                if all(r.cuda_only for r in all_rows if r.group == g):
                    why[g] = "skipped: no CUDA"
            batch = ",".join(g for g in batch.split(",") if g not in why)
        if not batch:
            continue
        left = deadline - time.time()
        budget = min(sum(GROUP_BUDGET_S[g] for g in batch.split(",")), left - 3)
        if budget < 10:
            for g in batch.split(","):
                why[g] = "skipped: time budget spent"
            continue
        tail = ["--results", str(results), "--workdir", str(workdir), "--deadline", str(time.time() + budget - 3)]
        if args.smoke:
            tail.append("--smoke")
        print(f"[gpu_check] group {batch}: up to {budget:.0f} s", flush=True)
        failure = run_group(group_command(batch, tail, args.accelerate), budget, log)
        if failure:
            for g in batch.split(","):
                why[g] = f"failed: {failure}"
    env, got = read_results(results)
    records = []
    for r in all_rows:
        rec = got.get(r.name)
        if rec is None:
            status = why.get(r.group)
            if status is None:
                status = ("skipped: no CUDA" if args.smoke and r.cuda_only
                          else "skipped: not selected (--groups)" if r.group not in selected
                          else "failed: the worker wrote no row (see the workers' log)")
            rec = {"name": r.name, "what": r.what, "status": status}
        records.append(rec)
    total = time.time() - start
    print(f"\nGPU check on {env.get('device', 'unknown device')}{' (--smoke)' if args.smoke else ''}, "
          f"{total:.0f} s; versions: {json.dumps(env.get('versions', {}))}\n")
    print(table(records))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "smoke": args.smoke, "total_s": round(total, 1),
                                               "rows": records}, indent=2))
    kept: Path | None = log
    if not args.workdir:  # the temporary folder goes; the workers' log (the failures' details) stays beside the JSON
        kept = Path(args.json).with_suffix(".log") if args.json else None
        if kept and log.is_file():
            shutil.copy(log, kept)
        shutil.rmtree(workdir, ignore_errors=True)
    if kept and kept.is_file() and any(not str(r["status"]).startswith(("ok", "skipped")) for r in records):
        print(f"\nthe workers' output: {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
