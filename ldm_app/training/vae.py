"""train_vae.py: the first stage of a latent diffusion model (Rombach et al. 2022), a KL- or VQ-regularised
autoencoder (diffusers' `AutoencoderKL` / `VQModel`) trained from scratch with the LDM / taming-transformers
objective (Esser et al. 2021):

    x_rec = D(z),  z ~ q(z | x0) = N(mean, std^2) (KL)  or  z = quantise(E(x0)) (VQ)        (B, C, f*h, f*w)
    L_ae  = rec(x0, x_rec) + w_reg * reg + [step >= disc_start] * lambda * (-E[D_patch(x_rec)])
    L_d   = hinge(D_patch(x0), D_patch(x_rec))                 (only from disc_start on)
rec = L1 (+ LPIPS if available), reg = KL(q || N(0, I)) or the VQ codebook/commitment loss, lambda the adaptive
weight (see losses.py). Two optimisers (autoencoder, discriminator), both prepared by accelerate.

Exact resume: every random draw of a step (the posterior sample) comes from `step_generator`, the data order from
(seed, epoch), so a checkpoint needs only what accelerate saves plus the data position (see training/common.py).

Output folder OUT: `checkpoint-N/` (accelerate state), `logs/` (TensorBoard), `run_config.json`, and the final
model in `OUT/vae/`: config.json + diffusion_pytorch_model.safetensors (loads with `AutoencoderKL.from_pretrained`
or `VQModel.from_pretrained`; its `scaling_factor` is measured from data), `train_config.yaml` (the run config
that made it) and `holdout.json` (the held-out image indices that `python -m ldm_app.evaluate vae` scores).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checkpointing import (LOADED_WEIGHTS, TRAINING_ROWS, load_checkpoint, lock_run_folder, save_checkpoint,
                             write_run_config)
from ..config import (AutoencoderConfig, DataConfig, TrainConfig, flag_overrides, load_config, merge, parse_overrides,
                      save_config, to_dict)
from ..errors import ArgumentParser, UserError, raise_if_stopped
from ..first_stage import HOLDOUT_FILE, TRAIN_CONFIG_FILE, encode_latents  # noqa: F401 (names of the run folder)
from ..losses import (NLayerDiscriminator, autoencoder_nll, disc_factor, generator_objective, hinge_d_loss,
                      load_lpips, reconstruction_loss)
from .common import (EmptyBatchGuard, Position, REPORT_TO, TrainProgress, batches, check_launchable, check_output_dir,
                     check_report_to, effective_lr, launched_processes, make_accelerator, make_lr_scheduler,
                     make_optimizer, open_run_folder, psnr, release_freed_memory, rows_sha256, setup_logging,
                     step_generator, weights_sha256)

logger = logging.getLogger("train_vae")

MODEL_SUBDIR = "vae"
# Settings a resumed run may change: the step budget, checkpoint cadence, logging, end-of-run measurements.
MAY_DIFFER_ON_RESUME = (
    "train.max_train_steps", "train.checkpointing_steps", "train.checkpoints_total_limit", "train.log_every",
    "data.dataloader_num_workers", "scale_num_images", "eval_num_images",
)


# --------------------------------------------------------------------------------------------------------------
# Run configuration


@dataclass
class VAELossConfig:
    """Weights of the LDM autoencoder objective (defaults: LDM's kl-f8 / vq-f8 configs)."""

    pixel_weight: float = 1.0  # L1
    mse_weight: float = 0.0  # squared error (not in LDM): PSNR is an L2 metric, see configs/vae/shapes64.yaml
    perceptual_weight: float = 1.0  # LPIPS, used only when the lpips package and its VGG weights are present
    kl_weight: float = 1e-6  # relative to the per-image *sum* of the L1 error (LDM's reduction)
    codebook_weight: float = 1.0  # weight of diffusers VQModel's commit_loss (VQ only)
    # VQ only: every N optimisation steps, codes that quantised no latent since the last check are moved onto
    # encoder outputs of the current batch (dead-code restart); 0 = never
    codebook_restart_every: int = 0
    disc_start: int = 50001  # step at which the discriminator and the GAN term switch on
    disc_weight: float = 0.5  # multiplies the adaptive weight lambda
    disc_factor: float = 1.0
    disc_channels: int = 64
    disc_num_layers: int = 3
    disc_learning_rate: float | None = None  # None: the autoencoder's learning rate (constant: no schedule)

    def validate(self) -> None:
        for name in ("pixel_weight", "mse_weight", "perceptual_weight", "kl_weight", "codebook_weight", "disc_weight",
                     "disc_factor"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise UserError(f"disc_start must be >= 0 (a step), got {self.disc_start}")
        if self.disc_channels < 1 or self.disc_num_layers < 1:
            raise UserError("disc_channels and disc_num_layers must be >= 1")
        if self.codebook_restart_every < 0:
            raise UserError(f"codebook_restart_every must be >= 0 (0: off), got {self.codebook_restart_every}")
        if self.disc_learning_rate is not None and self.disc_learning_rate <= 0:
            raise UserError(f"disc_learning_rate must be > 0 or null, got {self.disc_learning_rate}")


@dataclass
class VAERunConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    scale_num_images: int = 256  # training images encoded to measure the latent scaling_factor
    eval_num_images: int = 256  # held-out images scored at the end of training
    # Start from a trained autoencoder (a diffusers folder, safetensors) instead of random weights; its
    # architecture must be the `autoencoder` section's. With `train_decoder_only`, the encoder (and quant_conv)
    # stay frozen and the scaling factor is kept, so the latent space does not move: an LDM trained on the old
    # autoencoder works with the new decoder (how SD's ft-EMA / ft-MSE decoders were made).
    init_from: str = ""
    train_decoder_only: bool = False

    def validate(self) -> None:
        if self.train_decoder_only and not self.init_from:
            raise UserError("train_decoder_only needs a trained autoencoder to start from: give --pretrained_vae DIR")
        f = self.autoencoder.downsampling_factor
        if self.data.resolution % f:
            raise UserError(f"data.resolution ({self.data.resolution}) must be divisible by the autoencoder's "
                            f"downsampling factor {f}")
        if self.autoencoder.sample_size != self.data.resolution:
            raise UserError(f"autoencoder.sample_size ({self.autoencoder.sample_size}) must equal data.resolution "
                            f"({self.data.resolution}): set both")
        if self.scale_num_images < 1 or self.eval_num_images < 0:
            raise UserError("scale_num_images must be >= 1 and eval_num_images >= 0")
        if self.data.buckets:  # the autoencoder trains on square crops; silently ignoring the setting would mislead
            raise UserError("data.buckets is for train_ldm.py; train_vae.py trains on square crops (set "
                            "data.buckets=false)")


# --------------------------------------------------------------------------------------------------------------
# Command line




# flag -> config key; a flag given on the command line overrides that key (after --set)
FLAG_KEYS = {
    "train_data_dir": "data.train_data_dir", "dataset_name": "data.dataset_name",
    "caption_column": "data.caption_column", "image_column": "data.image_column",
    "max_train_steps": "train.max_train_steps", "checkpointing_steps": "train.checkpointing_steps",
    "seed": "train.seed",
    "mixed_precision": "train.mixed_precision", "learning_rate": "train.learning_rate",
    "train_batch_size": "train.train_batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "pretrained_vae": "init_from",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="train_vae.py",
                       description="Train a KL or VQ autoencoder (the LDM first stage) from scratch.")
    p.add_argument("--config", help="YAML file overriding the defaults (configs/vae/*.yaml)")
    p.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, and the final model in vae/")
    p.add_argument("--train_data_dir", help="a folder of images with a metadata.jsonl (file_name + caption column) "
                   "or a .txt caption file beside each image (see docs/training.md)")
    p.add_argument("--dataset_name", help="or a dataset on the Hugging Face hub (needs a network)")
    p.add_argument("--caption_column", help="the caption column of metadata.jsonl or the hub dataset (default: text)")
    p.add_argument("--image_column", help="the hub dataset's image column (default: image)")
    p.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' (fresh start if none)")
    p.add_argument("--pretrained_vae", help="start from this trained autoencoder folder (e.g. MODEL/vae) instead of "
                   "random weights; with --set train_decoder_only=true only its decoder is fine-tuned")
    for name in ("max_train_steps", "checkpointing_steps", "seed", "train_batch_size", "gradient_accumulation_steps"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--report_to", choices=REPORT_TO, default="tensorboard",
                   help="where the training curves go (OUT/logs for TensorBoard; 'all': every installed tracker)")
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> VAERunConfig:
    overrides = merge(parse_overrides(args.set), flag_overrides(args, FLAG_KEYS))
    return load_config(VAERunConfig, args.config, overrides)


# --------------------------------------------------------------------------------------------------------------
# The autoencoder's training forward


class AutoencoderForward(nn.Module):
    """x0 -> (x_rec, regulariser, code indices or None, encoder output before quantisation or None) in one
    module, so that accelerate (DDP) wraps the whole training forward and the posterior sample can use our
    per-step generator (diffusers' `forward` draws from the global RNG).

    A VQ model also carries `code_counts` (num_codes,): how many latents of all processes chose each code since
    the last dead-code restart (summed across processes every step, so DDP's buffer broadcast changes nothing).
    It is a buffer of this wrapper, so checkpoints keep it (exact resume) and the exported VQModel does not."""

    def __init__(self, vae: nn.Module, kind: str):
        super().__init__()
        self.vae = vae
        self.kind = kind
        if kind == "vq":
            self.register_buffer("code_counts", torch.zeros(vae.config.num_vq_embeddings))

    def forward(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        if self.kind == "kl":
            posterior = self.vae.encode(x0).latent_dist  # mean, std: (B, C, h, w)
            z = posterior.sample(generator=generator)
            kl = posterior.kl().sum() / x0.shape[0]  # LDM: KL summed over latent elements, averaged over images
            return self.vae.decode(z).sample, kl, None, None
        # VQ: commit_loss is ||sg(z_q) - z||^2 + 0.25 ||z_q - sg(z)||^2 (means; diffusers keeps taming's "legacy"
        # placement of beta), i.e. commitment and codebook terms together.
        h = self.vae.encode(x0).latents
        z_q, commit_loss, (_, _, indices) = self.vae.quantize(h)
        x_rec = self.vae.decode(z_q, force_not_quantize=True).sample  # z_q is quantised already
        return x_rec, commit_loss, indices, h


@torch.no_grad()
def restart_dead_codes(codebook: torch.Tensor, counts: torch.Tensor, h: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Dead-code restart (Dhariwal et al. 2020, "Jukebox"; Zeghidour et al. 2021, "SoundStream"): codebook rows
    (num_codes, C) that no latent chose since the last call (`counts`, the same on every process) are moved onto
    randomly drawn encoder outputs h (B, C, h, w) of this batch, so they are in use again from the next step.
    diffusers' VectorQuantizer has no such mechanism. Process 0's draw is broadcast so that every process keeps
    the same codebook. Resets `counts`; returns how many codes were restarted."""
    from accelerate.utils import broadcast

    dead = (counts == 0).nonzero().flatten()
    counts.zero_()
    if not dead.numel():
        return 0
    z = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*h*w, C) candidate vectors
    pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator, device=generator.device)
    codebook[dead] = broadcast(z[pick.to(z.device)].to(codebook.dtype).contiguous(), from_process=0)
    return int(dead.numel())


class DiscriminatorForward(nn.Module):
    """(x0, x_rec) -> hinge loss. Real and fake images go through the discriminator separately (their own
    BatchNorm batches, as in taming) but inside one forward: DDP needs one forward per backward."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, x0: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.disc(x0), self.disc(x_rec))


@torch.no_grad()
def measure_scaling_factor(vae: nn.Module, images: Iterator[torch.Tensor], seed: int) -> float:
    """1 / std of the latents of the given batches (LDM's `scale_by_std`), so that scaling_factor * z has unit
    variance like the diffusion prior N(0, I). KL latents are posterior samples, drawn with a seeded generator."""
    g = None
    latents = []
    for x0 in images:
        if g is None:
            g = torch.Generator(x0.device).manual_seed(seed)
        latents.append(encode_latents(vae, x0, g).float().flatten())
    return 1.0 / torch.cat(latents).std().item()


# --------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    step: int
    model_dir: Path
    metrics: dict[str, float]  # held-out scores of the final model (empty without held-out images)


class VAETrainer:
    def __init__(self, cfg: VAERunConfig, dataset: Any, holdout: dict[str, Any], accelerator: Any, out: Path):
        self.cfg, self.acc, self.out = cfg, accelerator, out
        self.dataset, self.holdout = dataset, holdout  # dataset: the training split
        self.kind = cfg.autoencoder.kind
        self.step, self.position, self.skipped = 0, Position(), 0
        self.lpips, reason = load_lpips() if cfg.loss.perceptual_weight > 0 else (None, "perceptual_weight is 0")
        if self.lpips is None:
            logger.info("LPIPS skipped: %s; training with the pixel losses only", reason)
        self._setup()

    def _setup(self) -> None:
        from accelerate.utils import set_seed

        from ..models import build_autoencoder

        cfg, acc = self.cfg, self.acc
        set_seed(cfg.train.seed)  # the initial weights
        vae = build_autoencoder(cfg.autoencoder)
        self.kept_scaling_factor = None
        if cfg.init_from:
            self.kept_scaling_factor = load_initial_weights(vae, cfg.init_from)
        if cfg.train_decoder_only:
            for frozen in (vae.encoder, getattr(vae, "quant_conv", None)):
                if frozen is not None:
                    frozen.requires_grad_(False)
        if cfg.train.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        model = AutoencoderForward(vae, self.kind)
        disc = DiscriminatorForward(NLayerDiscriminator(cfg.autoencoder.in_channels, cfg.loss.disc_channels,
                                                        cfg.loss.disc_num_layers))
        lr = effective_lr(cfg.train, acc.num_processes)
        opt_ae = make_optimizer([q for q in model.parameters() if q.requires_grad], cfg.train, lr)
        opt_d = make_optimizer(disc.parameters(), cfg.train, cfg.loss.disc_learning_rate or lr)
        sched = make_lr_scheduler(opt_ae, cfg.train, acc.num_processes)
        if self.lpips is not None:
            self.lpips.to(acc.device)
        self.model, self.disc, self.opt_ae, self.opt_d, self.sched = acc.prepare(model, disc, opt_ae, opt_d, sched)

    @property
    def vae(self) -> nn.Module:
        return self.acc.unwrap_model(self.model).vae

    def resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(self.acc, checkpoint)
        self.step = state["step"]
        self.position = Position(state["epoch"], state["batch"])
        self.skipped = state.get("skipped_images", 0)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, self.step, self.position.epoch,
                    self.position.batch)

    def train_step(self, x0: torch.Tensor, g: torch.Generator) -> dict[str, Any]:
        """One micro-batch: the autoencoder update, then (from disc_start on) the discriminator update."""
        cfg, acc = self.cfg.loss, self.acc
        factor = disc_factor(self.step, cfg.disc_start, cfg.disc_factor)
        x_rec, reg, indices, h = self.model(x0, g)
        rec_nll = autoencoder_nll(reconstruction_loss(x0, x_rec, self.lpips, cfg.pixel_weight, cfg.perceptual_weight,
                                                      cfg.mse_weight), self.kind)
        disc = acc.unwrap_model(self.disc).disc  # generator step: no discriminator gradients, so no DDP sync
        disc.requires_grad_(False)
        try:
            logits_fake = disc(x_rec) if factor > 0 else None
            reg_weight = cfg.kl_weight if self.kind == "kl" else cfg.codebook_weight
            loss, logs = generator_objective(rec_nll, reg, reg_weight, logits_fake,
                                             self.vae.decoder.conv_out.weight, cfg.disc_weight, factor)
            acc.backward(loss)
        finally:
            disc.requires_grad_(True)
        if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
        self.opt_ae.step()
        self.sched.step()
        self.opt_ae.zero_grad(set_to_none=True)
        if indices is not None:
            self._restart_dead_codes(indices, h, g, logs)
        if factor > 0:
            d_loss = factor * self.disc(x0.detach(), x_rec.detach())
            acc.backward(d_loss)
            if acc.sync_gradients and self.cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(self.disc.parameters(), self.cfg.train.max_grad_norm)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            logs["loss/disc"] = d_loss.detach()
        logs["psnr"] = psnr(x_rec.detach(), x0).mean()
        if indices is not None:
            logs["codebook/used_in_batch"] = torch.tensor(float(indices.unique().numel()))
        return logs

    def _restart_dead_codes(self, indices: torch.Tensor, h: torch.Tensor, g: torch.Generator,
                            logs: dict[str, Any]) -> None:
        """Count this micro-batch's code choices (all processes) and, every `codebook_restart_every`
        optimisation steps, restart the codes nobody chose (see `restart_dead_codes`)."""
        every, counts = self.cfg.loss.codebook_restart_every, self.acc.unwrap_model(self.model).code_counts
        if not every:
            return
        counts += self.acc.reduce(torch.bincount(indices.flatten(), minlength=counts.numel()).to(counts), "sum")
        if self.acc.sync_gradients and (self.step + 1) % every == 0:
            restarted = restart_dead_codes(self.vae.quantize.embedding.weight, counts, h, g)
            logs["codebook/restarted"] = torch.tensor(float(restarted))

    def data_stream(self) -> Iterator[tuple[Position, dict[str, Any]]]:
        from ..data.dataset import collate_fn

        return batches(self.dataset, self.cfg.train.train_batch_size, self.cfg.train.seed, self.acc, self.position,
                       collate_fn, self.cfg.data.dataloader_num_workers)

    def _empty_anywhere(self, x0: torch.Tensor) -> bool:
        """A batch whose images were all unreadable is skipped, by every process together (DDP needs that)."""
        n = torch.tensor([x0.shape[0]], device=self.acc.device)
        return bool(self.acc.gather(n).min() == 0) if self.acc.num_processes > 1 else n.item() == 0

    def run(self) -> None:
        train, acc = self.cfg.train, self.acc
        per_step = train.train_batch_size * train.gradient_accumulation_steps * acc.num_processes
        stream, micro, t0, last_saved = self.data_stream(), 0, time.time(), None
        guard = EmptyBatchGuard(len(self.dataset), train.train_batch_size, acc.num_processes)
        with TrainProgress("train_vae", train.max_train_steps, self.step, per_step, acc.is_main_process) as progress:
            while self.step < train.max_train_steps:
                raise_if_stopped()  # a SIGTERM/Ctrl-C that C code swallowed during the last step (ldm_app.errors)
                self.position, batch = next(stream)
                self.skipped += int(batch["num_skipped"])
                x0 = batch["pixel_values"]
                if guard.skip(self._empty_anywhere(x0), self.skipped, self.dataset):
                    continue
                with acc.accumulate(self.model, self.disc):
                    g = step_generator(train.seed, self.step * train.gradient_accumulation_steps + micro,
                                       acc.process_index, acc.device)
                    logs = self.train_step(x0, g)
                micro += 1
                if not acc.sync_gradients:
                    continue
                self.step, micro = self.step + 1, 0
                progress.update(lambda: {"loss": logs["loss/total"].item(), "psnr": logs["psnr"].item()})
                if self.step % train.log_every == 0 or self.step == train.max_train_steps:
                    self._log(logs, t0)
                    release_freed_memory()
                if self.step % train.checkpointing_steps == 0:
                    self.save()
                    last_saved = self.step
        if last_saved != self.step:
            self.save()
        if self.skipped:
            logger.warning("skipped %d unreadable image loads during training (see the warnings naming them)",
                           self.skipped)

    def _log(self, logs: dict[str, Any], t0: float) -> None:
        values = {k: float(v) for k, v in logs.items()}
        values["lr"] = self.sched.get_last_lr()[0]
        values["data/skipped_images"] = self.skipped
        values["steps_per_second"] = self.step / max(time.time() - t0, 1e-9)  # since this process started
        self.acc.log(values, step=self.step)

    def save(self) -> None:
        state = {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                 "skipped_images": self.skipped}
        path = save_checkpoint(self.acc, self.out, self.step, state,
                               total_limit=self.cfg.train.checkpoints_total_limit)
        logger.info("saved %s", path)

    def export(self) -> Path:
        """Measure the scaling factor, then write OUT/vae atomically (main process)."""
        from ..fileio import atomic_dir

        dest = self.out / MODEL_SUBDIR
        if self.acc.is_main_process:
            vae = self.vae.eval()
            if self.cfg.train_decoder_only:  # same encoder, same latents: the LDM's scale must not move
                factor = self.kept_scaling_factor
                logger.info("latent scaling_factor = %.5f (kept from %s: the encoder was frozen)", factor,
                            self.cfg.init_from)
            else:
                factor = measure_scaling_factor(vae, self._first_images(self.cfg.scale_num_images),
                                                self.cfg.train.seed)
                logger.info("latent scaling_factor = %.5f (1 / std of the latents of %d training images)", factor,
                            min(self.cfg.scale_num_images, len(self.dataset)))
            vae.register_to_config(scaling_factor=factor)
            cfg = replace(self.cfg, autoencoder=replace(self.cfg.autoencoder, scaling_factor=factor))
            with atomic_dir(dest) as tmp:
                vae.save_pretrained(tmp, safe_serialization=True)
                save_config(cfg, tmp / TRAIN_CONFIG_FILE)
                (tmp / HOLDOUT_FILE).write_text(json.dumps(self.holdout))
            logger.info("autoencoder written to %s", dest)
        self.acc.wait_for_everyone()
        return dest

    def _first_images(self, n: int) -> Iterator[torch.Tensor]:
        from torch.utils.data import DataLoader

        from ..data.dataset import collate_fn

        loader = DataLoader(torch.utils.data.Subset(self.dataset, range(min(n, len(self.dataset)))),
                            batch_size=self.cfg.train.train_batch_size, collate_fn=collate_fn)
        for batch in loader:
            if batch["pixel_values"].shape[0]:
                yield batch["pixel_values"].to(self.acc.device)

    def evaluate_holdout(self, model_dir: Path) -> dict[str, float]:
        """Score the saved model on (up to eval_num_images of) the held-out images, log and print the result."""
        from ..evaluate import evaluate_vae, format_vae_metrics

        if not self.acc.is_main_process or not self.holdout["indices"] or not self.cfg.eval_num_images:
            return {}
        metrics = evaluate_vae(model_dir, self.cfg.data.train_data_dir, self.cfg.eval_num_images,
                               batch_size=self.cfg.train.train_batch_size, device=self.acc.device)
        self.acc.log({f"holdout/{k}": v for k, v in metrics.items()}, step=self.step)
        logger.info("final model on %s", format_vae_metrics(metrics))
        return metrics


# --------------------------------------------------------------------------------------------------------------
# Entry point


def load_initial_weights(vae: nn.Module, folder: str) -> float:
    """Copy a trained autoencoder's weights (FOLDER/diffusion_pytorch_model.safetensors, never a pickle) into
    `vae`, built from the run config; returns its scaling factor. One-line errors for a missing folder or a
    different architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    weights, config = path / "diffusion_pytorch_model.safetensors", path / "config.json"
    if not weights.is_file() or not config.is_file():
        raise UserError(f"--pretrained_vae {folder}: expected an autoencoder folder with config.json and "
                        "diffusion_pytorch_model.safetensors (e.g. MODEL/vae)")
    try:
        state = load_file(str(weights))
        scaling_factor = float(json.loads(config.read_text()).get("scaling_factor", 1.0))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--pretrained_vae {folder}: cannot read it ({e})") from None
    state = {k: v.float() for k, v in state.items()}  # e.g. an fp16 export
    mine = vae.state_dict()
    wrong = sorted(set(mine) ^ set(state)) + sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if wrong:
        raise UserError(f"--pretrained_vae {folder} does not match the config's autoencoder section ({len(wrong)} "
                        f"weights differ, e.g. {wrong[0]}): use the config it was trained with")
    vae.load_state_dict(state)
    return scaling_factor


def build_datasets(cfg: VAERunConfig) -> tuple[Any, dict[str, Any]]:
    """(training split, holdout record); the split is drawn from (n, holdout_fraction, seed)."""
    from ..data.dataset import build_dataset, split_indices

    d = cfg.data
    full = build_dataset(d.train_data_dir, d.dataset_name, d.resolution, d.center_crop, d.random_flip,
                         d.caption_column, d.image_column, d.max_samples)
    train_idx, holdout_idx = split_indices(len(full), d.holdout_fraction, cfg.train.seed)
    holdout = {"num_images": len(full), "holdout_fraction": d.holdout_fraction, "seed": cfg.train.seed,
               "indices": holdout_idx}
    return full.select(train_idx), holdout


def check_enough_images(n: int, batch_size: int, num_processes: int) -> None:
    per_step = batch_size * num_processes
    if n < per_step:
        raise UserError(f"the training split has {n} images, fewer than one batch ({per_step}): "
                        "add images, lower train.train_batch_size or data.holdout_fraction")


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse, check every input (one-line errors), train, export OUT/vae and score it on the held-out images.

    Order matters: the config and the data are checked before the output folder is touched, so a mistaken
    command leaves nothing behind; then the folder is locked for the whole run (see
    checkpointing.lock_run_folder) before anything reads or writes it; run_config.json, which ties the folder to
    this config, is written last, just before the first step."""
    args = parse_args(argv)
    cfg = load_run_config(args)
    setup_logging()
    check_report_to(args.report_to)
    check_launchable(args.cpu)
    loaded = {}  # run_config.json records the starting weights: a resume from other files is refused
    if cfg.init_from:  # checked before the output folder is touched, like the config and the data
        from ..models import build_autoencoder

        initial = build_autoencoder(cfg.autoencoder)
        scaling_factor = load_initial_weights(initial, cfg.init_from)
        initial.register_to_config(scaling_factor=scaling_factor)  # the file's scale, as the trainer keeps it
        loaded["autoencoder"] = weights_sha256(initial)
    train_set, holdout = build_datasets(cfg)
    source = cfg.data.train_data_dir or cfg.data.dataset_name
    train_set = train_set.readable(f"the training split of {source} ({len(holdout['indices'])} held out)"
                                   if holdout["indices"] else str(source))
    check_enough_images(len(train_set), cfg.train.train_batch_size, launched_processes())
    check_output_dir(args.output_dir, {"--pretrained_vae": cfg.init_from}, cfg.data.train_data_dir)
    with lock_run_folder(args.output_dir):
        record = {**to_dict(cfg), LOADED_WEIGHTS: loaded, TRAINING_ROWS: rows_sha256(train_set)}
        out, checkpoint = open_run_folder(args.output_dir, record, args.resume_from_checkpoint, MAY_DIFFER_ON_RESUME)
        accelerator = make_accelerator(cfg.train, out, cpu=args.cpu, report_to=args.report_to)
        check_enough_images(len(train_set), cfg.train.train_batch_size, accelerator.num_processes)
        accelerator.init_trackers("train_vae")
        logger.info("%s autoencoder, f=%d; %d training images, %d held out", cfg.autoencoder.kind,
                    cfg.autoencoder.downsampling_factor, len(train_set), len(holdout["indices"]))
        trainer = VAETrainer(cfg, train_set, holdout, accelerator, out)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if accelerator.is_main_process:
            write_run_config(out, record)
        trainer.run()
        model_dir = trainer.export()
        metrics = trainer.evaluate_holdout(model_dir)
        accelerator.end_training()
        return TrainResult(trainer.step, model_dir, metrics)
