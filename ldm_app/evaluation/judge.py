"""An attribute judge for the synthetic shapes domain: a small CNN that reads a scene back from its pixels.

It is trained on freshly rendered scenes (`ldm_app.data.shapes` is only its data source: nothing here draws or
measures shapes by hand) and must score >= 99% on every attribute of its own held-out renders before it judges
anything. Trained judges are cached (safetensors + JSON, never committed) so later evaluations reuse them.

Heads (logits), with the label -1 ("does not apply") ignored in the loss and in the accuracies:
- every image: `count` (one or two objects), `background`;
- one-object images: `colour`, `shape`, `size`, `position`;
- two-object images, in a canonical order that removes the ambiguity of "A above B" == "B below A": `axis`
  (vertical: top/bottom, horizontal: left/right), then colour and shape of the `first` object (the top or left
  one) and of the `second` (the bottom or right one).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_app.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, render_scene, sample_scene
from ldm_app.errors import UserError
from ldm_app.fileio import atomic_dir

# Bump when the network, the labels or the training recipe change: it is part of the cache key.
JUDGE_VERSION = 2
DEFAULT_THRESHOLD = 0.99
WEIGHTS_FILE = "judge.safetensors"
INFO_FILE = "judge.json"

AXES: tuple[str, ...] = ("vertical", "horizontal")
_FIRST_POSITIONS = ("top", "left")  # the canonical first object of a two-object scene
# head -> class names
HEADS: dict[str, tuple[str, ...]] = {
    "count": ("one", "two"),
    "background": tuple(BACKGROUNDS),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "axis": AXES,
    "first_colour": tuple(COLOURS),
    "first_shape": SHAPES,
    "second_colour": tuple(COLOURS),
    "second_shape": SHAPES,
}
ONE_OBJECT_HEADS = ("colour", "shape", "size", "position")
TWO_OBJECT_HEADS = ("axis", "first_colour", "first_shape", "second_colour", "second_shape")


class JudgeAccuracyError(UserError):
    """The judge is not accurate enough on its own held-out renders to be trusted with generated images."""


@dataclass(frozen=True)
class JudgeConfig:
    resolution: int = 64  # judge input side; other images are resized to it
    seed: int = 0
    num_train: int = 3000  # rendered training scenes
    num_heldout: int = 1500  # rendered held-out scenes (a separate seed stream)
    two_object_fraction: float = 0.35  # more two-object scenes than the dataset's 0.25: they feed five heads
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 3e-3
    width: int = 16  # channels of the first conv level (doubling, capped at 8 * width)
    feature_dim: int = 128  # penultimate features (also used for the domain KID)
    # Training augmentation, for robustness to generated images (softer edges, grain): each image is blended with
    # its 3x3 box blur by a random weight in [0, 1], then gets Gaussian noise of a random std in [0, noise_std].
    noise_std: float = 0.04

    def key(self) -> str:
        """Cache key: the judge version and every setting that changes the trained weights."""
        text = json.dumps({"version": JUDGE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def scene_labels(scene: Scene) -> dict[str, int]:
    """Class index per head for a rendered scene; -1 where the head does not apply."""
    labels = {name: -1 for name in HEADS}
    labels["background"] = HEADS["background"].index(scene.background)
    if scene.relation is None:
        (obj,) = scene.objects
        labels.update(
            count=0,
            colour=HEADS["colour"].index(obj.colour),
            shape=HEADS["shape"].index(obj.shape),
            size=HEADS["size"].index(obj.size),
            position=HEADS["position"].index(obj.position),
        )
        return labels
    first, second = sorted(scene.objects, key=lambda o: o.position not in _FIRST_POSITIONS)
    labels.update(
        count=1,
        axis=AXES.index("vertical" if first.position == "top" else "horizontal"),
        first_colour=HEADS["first_colour"].index(first.colour),
        first_shape=HEADS["first_shape"].index(first.shape),
        second_colour=HEADS["second_colour"].index(second.colour),
        second_shape=HEADS["second_shape"].index(second.shape),
    )
    return labels


def _block(c_in: int, c_out: int, first: bool) -> nn.Sequential:
    """conv-BN-ReLU halving the resolution: by a strided conv at full resolution (max-pooling there is the costliest
    part of a CPU step), by max-pooling after that."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=2 if first else 1, padding=1, bias=False)
    pool = [] if first else [nn.MaxPool2d(2)]
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), *pool)


class JudgeNet(nn.Module):
    """Conv levels down to 4x4, then a flatten (keeps where things are: positions and relations are heads) and an
    MLP layer giving the penultimate features, then one linear head per attribute."""

    def __init__(self, resolution: int, width: int, feature_dim: int):
        super().__init__()
        levels = int(math.log2(resolution // 4))
        if resolution < 16 or resolution != 4 * 2**levels:
            raise UserError(f"judge resolution must be a power of two >= 16, got {resolution}")
        channels = [3] + [min(width * 2**i, 8 * width) for i in range(levels)]
        self.trunk = nn.Sequential(*(_block(a, b, i == 0) for i, (a, b) in enumerate(itertools.pairwise(channels))))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 16, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> penultimate features (B, feature_dim)."""
        return self.fc(self.trunk(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}  # name -> (B, classes)


def render_labelled(
    num: int, resolution: int, seed: int, stream: int, two_object_fraction: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`num` fresh renders as uint8 (num, 3, R, R) and their labels (head -> (num,) int64). Scene i comes from its
    own generator seeded (seed, stream, i), so training and held-out streams never share a scene draw."""
    images = np.empty((num, resolution, resolution, 3), dtype=np.uint8)
    labels: dict[str, list[int]] = {name: [] for name in HEADS}
    for i in range(num):
        scene = sample_scene(np.random.default_rng([seed, stream, i]), resolution, two_object_fraction)
        images[i] = np.asarray(render_scene(scene, resolution))
        for name, value in scene_labels(scene).items():
            labels[name].append(value)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return pixels, {name: torch.tensor(v, dtype=torch.long) for name, v in labels.items()}


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0  # uint8 -> [-1, 1]


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    # Mean over heads of each head's mean over the images it applies to (a batch with none contributes 0).
    losses = [
        F.cross_entropy(logits[name], labels[name], ignore_index=-1, reduction="sum")
        / (labels[name] >= 0).sum().clamp(min=1)
        for name in HEADS
    ]
    return torch.stack(losses).mean()


@dataclass
class Judge:
    net: JudgeNet
    config: JudgeConfig
    heldout_accuracy: dict[str, float] = field(default_factory=dict)
    # RMS of a held-out render's penultimate features per dimension: features are divided by it so that KID's
    # kernel (x.y / d + 1)^3 sees O(1) values, as with Inception features (raw ReLU features are far larger).
    feature_scale: float = 1.0
    train_seconds: float = 0.0
    folder: Path | None = None  # where it is cached, if it is

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] (any size) -> the judge's input (B, 3, R, R) in [-1, 1]. Resizing uses
        antialiased bilinear so that larger generated images are not aliased."""
        x = images.float()
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch_size: int, fn) -> list:
        self.net.eval()
        device = next(self.net.parameters()).device
        return [fn(self.prepare(images[i : i + batch_size]).to(device)) for i in range(0, len(images), batch_size)]

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> predicted class index per head (B,); names in `HEADS`."""
        outs = self._run(images, batch_size, lambda x: {k: v.argmax(1).cpu() for k, v in self.net(x).items()})
        return {name: torch.cat([o[name] for o in outs]) for name in HEADS}

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled penultimate features (B, feature_dim), float64 on CPU (for KID)."""
        return (
            torch.cat(self._run(images, batch_size, lambda x: self.net.features(x).double().cpu())) / self.feature_scale
        )

    def check(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        """Refuse (JudgeAccuracyError, with the figures) unless every held-out accuracy is >= `threshold`."""
        missing = set(HEADS) - set(self.heldout_accuracy)
        if missing:
            raise JudgeAccuracyError(f"judge has no held-out accuracy for {', '.join(sorted(missing))}; retrain it")
        low = {k: v for k, v in self.heldout_accuracy.items() if not v >= threshold}  # NaN (no such images) fails too
        if low:
            figures = ", ".join(f"{k}={v:.4f}" for k, v in sorted(low.items()))
            raise JudgeAccuracyError(
                f"attribute judge below {threshold:.2%} on its held-out renders ({figures}); "
                "train it with a larger budget (num_train/epochs) before judging generated images"
            )


def heldout_accuracy(judge: Judge, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy on uint8 renders (N, 3, R, R), over the images each head applies to."""
    pred = judge.predict(pixels.float() / 255.0)
    acc = {}
    for name in HEADS:
        mask = labels[name] >= 0
        acc[name] = float((pred[name][mask] == labels[name][mask]).float().mean()) if mask.any() else float("nan")
    return acc


def _augment(x: torch.Tensor, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """x (B, 3, R, R) in [-1, 1]: blend with its 3x3 box blur, add Gaussian noise (std in [0, 1] pixel units)."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    weight = torch.rand(len(x), 1, 1, 1, generator=gen)
    sigma = torch.rand(len(x), 1, 1, 1, generator=gen) * noise_std * 2  # x2: [-1, 1] units
    return torch.lerp(x, blurred, weight) + sigma * torch.randn(x.shape, generator=gen)


def _train_epochs(
    net: JudgeNet, pixels: torch.Tensor, labels: dict[str, torch.Tensor], cfg: JudgeConfig, log: Callable[[str], None]
) -> None:
    """Adam with a one-cycle learning rate; shuffling and noise come from one generator seeded by cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(pixels) / cfg.batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.epochs * steps_per_epoch)
    net.train()
    for epoch in range(cfg.epochs):
        total = 0.0
        order = torch.randperm(len(pixels), generator=gen)
        for i in range(0, len(pixels), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = _augment(_to_unit(pixels[idx]), cfg.noise_std, gen)  # (b, 3, R, R)
            loss = _loss(net(x), {k: v[idx] for k, v in labels.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"judge epoch {epoch + 1}/{cfg.epochs}: loss {total / len(pixels):.4f}")
    net.eval()


@contextlib.contextmanager
def _one_thread():
    """Run torch on one intra-op thread, then restore the caller's setting. This net's small convolutions gain little
    from a second thread, and on a shared 2-core machine OpenMP threads waiting on each other's barriers made judge
    training 3-4x slower in wall time (measured: ~100 s with one thread vs >400 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_judge(config: JudgeConfig = JudgeConfig(), log: Callable[[str], None] = print) -> Judge:
    """Render, train and measure a judge on CPU; the same config gives the same weights on one machine."""
    with _one_thread():
        return _train_judge(config, log)


def _train_judge(config: JudgeConfig, log: Callable[[str], None]) -> Judge:
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the caller's global RNG
        torch.manual_seed(config.seed)
        net = JudgeNet(config.resolution, config.width, config.feature_dim)
    pixels, labels = render_labelled(config.num_train, config.resolution, config.seed, 0, config.two_object_fraction)
    _train_epochs(net, pixels, labels, config, log)
    judge = Judge(net=net, config=config)
    test_pixels, test_labels = render_labelled(
        config.num_heldout, config.resolution, config.seed, 1, config.two_object_fraction
    )
    judge.heldout_accuracy = heldout_accuracy(judge, test_pixels, test_labels)
    judge.feature_scale = float(judge.features(test_pixels.float() / 255.0).square().mean().sqrt())
    judge.train_seconds = time.perf_counter() - start
    return judge


def default_cache_root() -> Path:
    """$LDM_APP_CACHE, else ~/.cache/ldm_app."""
    return Path(os.environ.get("LDM_APP_CACHE", "~/.cache/ldm_app")).expanduser()


def judge_folder(config: JudgeConfig, cache_root: str | os.PathLike | None = None) -> Path:
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"judge-{config.key()}"


def save_judge(judge: Judge, folder: str | os.PathLike) -> Path:
    """Write weights (safetensors) and judge.json (version, config, held-out accuracies), atomically."""
    folder = Path(folder)
    info = {
        "version": JUDGE_VERSION,
        "config": asdict(judge.config),
        "heldout_accuracy": judge.heldout_accuracy,
        "feature_scale": judge.feature_scale,
        "train_seconds": judge.train_seconds,
    }
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in judge.net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    judge.folder = folder
    return folder


def load_judge(folder: str | os.PathLike) -> Judge:
    """Load a saved judge; strict: a missing/unexpected weight or another version is an error."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        if info.get("version") != JUDGE_VERSION:
            raise UserError(f"{folder}: judge version {info.get('version')} != {JUDGE_VERSION}; delete it to retrain")
        config = JudgeConfig(**info["config"])
        net = JudgeNet(config.resolution, config.width, config.feature_dim)
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        heldout, feature_scale = info["heldout_accuracy"], float(info["feature_scale"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot load the judge in {folder} ({type(e).__name__}: {e}); delete it to retrain") from e
    return Judge(net.eval(), config, heldout, feature_scale, info.get("train_seconds", 0.0), folder)


def load_or_train_judge(
    config: JudgeConfig = JudgeConfig(),
    cache_root: str | os.PathLike | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    log: Callable[[str], None] = print,
) -> Judge:
    """The cached judge for `config` (trained and cached first if absent), checked against `threshold`.

    A judge that fails the check is still cached (its figures don't change by retraining the same config), so a
    later call fails fast with the same message."""
    folder = judge_folder(config, cache_root)
    if (folder / INFO_FILE).is_file():
        judge = load_judge(folder)
    else:
        log(f"training the attribute judge ({config.num_train} renders at {config.resolution}px); cached in {folder}")
        judge = train_judge(config, log)
        save_judge(judge, folder)
        log(
            f"judge trained in {judge.train_seconds:.0f}s; held-out accuracy: {format_accuracy(judge.heldout_accuracy)}"
        )
    judge.check(threshold)
    return judge


def format_accuracy(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2%}" for k, v in acc.items())
