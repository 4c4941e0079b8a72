"""The data stream re-enters an epoch exactly where a resumed run stopped; per-step randomness is a function
of (seed, step, process); heap pages PyTorch freed go back to the OS."""

import os
import platform

import pytest
import torch
from accelerate import Accelerator

from ldm_app.training.common import Position, batches, effective_lr, make_optimizer, psnr, step_generator
from ldm_app.config import TrainConfig


def take(stream, n):
    return [(pos, b.tolist()) for _, (pos, b) in zip(range(n), stream)]


def test_resume_mid_epoch_continues_the_same_order():
    acc = Accelerator(cpu=True)
    data = torch.arange(10).float()
    straight = take(batches(data, 3, seed=0, accelerator=acc, start=Position()), 7)
    # every epoch is a permutation of the data (3 batches of 3, one item dropped)
    first_epoch = sum((b for p, b in straight if p.epoch == 0), [])
    assert len(set(first_epoch)) == 9
    assert [b for p, b in straight if p.epoch == 0] != [b for p, b in straight if p.epoch == 1]
    resumed = take(batches(data, 3, seed=0, accelerator=acc, start=straight[1][0]), 5)
    assert resumed == straight[2:]


def test_step_generator_is_a_function_of_seed_step_process():
    draw = lambda *a: torch.randn(4, generator=step_generator(*a)).tolist()
    assert draw(0, 5, 0) == draw(0, 5, 0)
    assert draw(0, 5, 0) != draw(0, 6, 0)
    assert draw(0, 5, 0) != draw(0, 5, 1)
    assert draw(0, 5, 0) != draw(1, 5, 0)


def test_scale_lr_and_psnr():
    cfg = TrainConfig(learning_rate=1e-4, train_batch_size=8, gradient_accumulation_steps=2, scale_lr=True)
    assert effective_lr(cfg, num_processes=4) == 1e-4 * 64
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[1] += 0.2  # MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    p = psnr(x, y)
    assert abs(p[1].item() - 20.0) < 1e-4
    assert p[0] > 100


def test_lr_schedule_counts_optimisation_steps_under_several_processes():
    """accelerate steps a prepared scheduler once per process; warm-up must still last lr_warmup_steps."""
    from ldm_app.training.common import make_lr_scheduler

    cfg = TrainConfig(learning_rate=1.0, lr_warmup_steps=4, max_train_steps=8, lr_scheduler="constant_with_warmup")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(opt, cfg, num_processes=2)
    lrs = []
    for _ in range(4):  # 4 optimisation steps = 8 scheduler steps with 2 processes
        for _ in range(2):
            opt.step()  # (no gradients: a no-op, in the order torch expects, so no warning)
            sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[-1] == 1.0 and lrs[0] < 1.0


def test_fused_adam_is_the_same_update_as_the_loop():
    """fused_adam picks torch's fused AdamW kernel; both settings take the same step up to float rounding."""
    torch.manual_seed(0)
    w0, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(3)]
    results = {}
    for fused in (True, False):
        w = torch.nn.Parameter(w0.clone())
        opt = make_optimizer([w], TrainConfig(fused_adam=fused, adam_weight_decay=0.01), lr=1e-2)
        assert bool(opt.defaults["fused"]) is fused
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results[fused] = w.detach()
    assert not torch.equal(results[True], w0)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-6)


# ---- memory freed by PyTorch goes back to the OS ---------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux only")
def test_release_freed_memory_returns_the_heap_pages_pytorch_freed():
    from ldm_app.training.common import release_freed_memory

    # 200 MB of 4 KB tensors (below glibc's mmap threshold, so they live on the heap), then one more on top that
    # stays alive: glibc cannot shrink the heap past it, so freeing the rest leaves the pages in the process.
    small = [torch.ones(1024) for _ in range(50_000)]
    pin = torch.ones(1024)
    del small
    before = _rss_bytes()
    assert release_freed_memory() is True
    after = _rss_bytes()
    assert before - after > 100 * 2**20, (before, after)
    assert pin.sum().item() == 1024


def test_deepspeed_micro_batch_is_filled_from_the_run_config():
    """Our trainers give accelerate no DataLoader, so an "auto" DeepSpeed micro-batch must come from the config;
    a value the DeepSpeed config sets itself is kept, and a run without DeepSpeed is left alone."""
    from types import SimpleNamespace

    from ldm_app.training.common import fill_deepspeed_batch

    auto = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"}))
    fill_deepspeed_batch(auto, 32)
    assert auto.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 32
    unset = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={}))
    fill_deepspeed_batch(unset, 8)
    assert unset.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 8
    fixed = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": 4}))
    fill_deepspeed_batch(fixed, 32)
    assert fixed.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    fill_deepspeed_batch(SimpleNamespace(deepspeed_plugin=None), 32)  # no DeepSpeed: nothing to do, no error


def test_deepspeed_unet_gets_its_inputs_in_its_own_dtype():
    """DeepSpeed casts the U-Net's weights to bf16/fp16 and runs it without autocast (the first GPU check failed
    with "mat1 and mat2 must have the same dtype"): the trainer casts x_t, c and scalar labels to that dtype and
    takes eps back in float32; under DDP/FSDP (accelerate's autocast) nothing is cast."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from diffusers import UNet2DConditionModel

    from ldm_app.training.ldm import deepspeed_input_dtype, predict_eps

    def acc(kind, precision):
        return SimpleNamespace(distributed_type=kind, mixed_precision=precision)

    assert deepspeed_input_dtype(acc(DistributedType.DEEPSPEED, "bf16")) is torch.bfloat16
    assert deepspeed_input_dtype(acc(DistributedType.DEEPSPEED, "fp16")) is torch.float16
    assert deepspeed_input_dtype(acc(DistributedType.DEEPSPEED, "no")) is None
    assert deepspeed_input_dtype(acc(DistributedType.FSDP, "bf16")) is None
    assert deepspeed_input_dtype(acc(DistributedType.MULTI_GPU, "bf16")) is None

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    reference = predict_eps(unet, x, t, c, None, None)
    unet.to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the weights
    with pytest.raises(RuntimeError, match="dtype"):  # float32 inputs: the failure seen on the GPU
        predict_eps(unet, x, t, c, None, None)
    eps = predict_eps(unet, x, t, c, None, torch.bfloat16)
    assert eps.dtype is torch.float32 and eps.shape == x.shape
    assert torch.allclose(eps, reference, atol=0.1), (eps - reference).abs().max()  # bf16 rounding only
