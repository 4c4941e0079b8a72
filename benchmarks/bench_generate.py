"""Speed of `LatentDiffusionPipeline` vs diffusers' `StableDiffusionPipeline`: same weights, scheduler and steps.

Both pipelines share the very same module objects (a small random-weight SD-like model, U-Net 12.8M parameters),
run in one process, alternating (the order flips every round so drift in machine load hits both alike), after one
warm-up each. Reports the median wall and CPU seconds of each and the median of the per-round ratio
ours/diffusers (target: <= 1.0). On a shared CPU the ratio is the figure to trust, not the absolute times; with
--threads 1 the CPU-time ratio is the least disturbed by other processes.

    python benchmarks/bench_generate.py --runs 5 --steps 10 --size 256
    python benchmarks/bench_generate.py --model sd15 --device cuda --dtype fp16 --size 512 --steps 20 --runs 10

--model sd15 builds an SD-1.5-sized model instead (gpu_check.sd15_components: 860M U-Net, random weights,
DPM-Solver++) on --device: the GPU parity check, where batch 1 is bound by kernel launches and Python overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from ldm_app.errors import UserError, run_cli  # noqa: E402
from ldm_app.pipeline import LatentDiffusionPipeline  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "ldm_app" / "assets" / "tokenizer"
TEXT_DIM = 256
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a watercolor painting of a lighthouse at dusk"


def build_components(size: int, seed: int = 0) -> dict:
    """A small but not trivial SD-1.x-shaped model with random weights (f = 8: latents size/8)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64, 64),  # decoding at full resolution dominates otherwise
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        "unet": unet.eval(),
        "scheduler": scheduler,
    }


def timed_run(pipe, args: argparse.Namespace) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds for one full generation (text encoding, sampling loop, decoding), and its image
    (1, 3, H, W). CPU time is what other processes on a shared machine disturb least. On a GPU the clock stops
    after a synchronize (the work is queued asynchronously)."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    image = pipe(
        PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
        generator=torch.Generator(args.device).manual_seed(0), output_type="pt",
    ).images
    sync()
    return time.perf_counter() - start, time.process_time() - start_cpu, image.float().cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each pipeline (after one warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per image")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels (multiple of 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--model", choices=["small", "sd15"], default="small",
                        help="small: a 12.8M-parameter U-Net, DDIM (default); sd15: SD-1.5-sized, DPM-Solver++")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.steps < 1 or args.size < 8 or args.size % 8:
        raise UserError("--runs and --steps must be >= 1 and --size a positive multiple of 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch sees no CUDA device here")

    if args.model == "sd15":
        from gpu_check import sd15_components  # benchmarks/ is on the path when this file runs

        components = sd15_components(args.device)
    else:
        components = build_components(args.size)
    ours = LatentDiffusionPipeline(**components).to(args.device, DTYPES[args.dtype])
    theirs = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    pipes = {"ldm_app": ours, "diffusers": theirs}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    images = {name: timed_run(pipe, args)[2] for name, pipe in pipes.items()}  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in pipes}
    cpu: dict[str, list[float]] = {name: [] for name in pipes}
    for i in range(args.runs):
        for name in (list(pipes) if i % 2 == 0 else list(pipes)[::-1]):
            seconds, cpu_seconds, _ = timed_run(pipes[name], args)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    n_params = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"U-Net {n_params:.1f}M params, {args.size}x{args.size}, {args.steps} "
          f"{type(ours.scheduler).__name__} steps, guidance 7.5, {args.dtype}, {args.runs} runs, {where}")
    print(f"max pixel difference between the two images: {(images['ldm_app'] - images['diffusers']).abs().max():.2e}")
    print(f"{'':<22}{'ldm_app':>10}{'diffusers':>10}{'ratio':>8}")
    for label, t in (("wall s (median)", wall), ("cpu s (median)", cpu)):
        ratio = statistics.median(a / b for a, b in zip(t["ldm_app"], t["diffusers"]))  # per-round ratios
        print(f"{label:<22}{statistics.median(t['ldm_app']):>10.3f}{statistics.median(t['diffusers']):>10.3f}"
              f"{ratio:>8.3f}")
    print("ratio = median over rounds of ldm_app/diffusers (target <= 1.0)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
