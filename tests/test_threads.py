"""One pipeline object called from several threads at once gives exactly the images of the same calls made one at a
time: each call samples with its own scheduler (per-call `sampler=`), so no scheduler state, timestep grid or
tokenizer setting is shared between calls."""

from __future__ import annotations

import threading

import pytest
import torch

from ldm_app.pipeline import LatentDiffusionPipeline

# (sampler, steps, prompt): different samplers, step counts and prompt lengths in flight together; dpm++ keeps
# its previous outputs between steps and euler_a draws fresh noise per step, the two that failed when shared
CALLS = [
    ("ddim", 2, "a red circle"),
    ("dpm++", 3, "a large blue square on the left on a white background"),
    ("euler_a", 4, "x"),
    ("ddpm", 2, "a green triangle at the top"),
    ("dpm++", 5, "two small objects"),
    ("euler", 3, "a yellow circle " * 3),
    ("ddim", 4, "a purple square"),
    ("pndm", 3, "an orange triangle"),
    ("euler_a", 2, "a gray background"),
    ("ddpm", 3, "a blue circle below a red square"),
    ("plms", 4, "a"),
    ("dpm++", 2, "a small green square in the center"),
]
THREADS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def one_call(pipe: LatentDiffusionPipeline, index: int) -> torch.Tensor:
    sampler, steps, prompt = CALLS[index]
    generator = [torch.Generator().manual_seed(100 + index), torch.Generator().manual_seed(200 + index)]
    return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, num_images_per_prompt=2, sampler=sampler,
                generator=generator, output_type="pt").images  # fmt: skip


def test_threads_on_one_pipeline_give_the_sequential_images(tiny_pipeline):
    scheduler_before = tiny_pipeline.scheduler
    config_before = dict(scheduler_before.config)
    sequential = [one_call(tiny_pipeline, i) for i in range(len(CALLS))]

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(first: int) -> None:
        start.wait()
        try:
            for i in range(first, len(CALLS), THREADS):  # 3 calls per thread, interleaved with the others
                results[i] = one_call(tiny_pipeline, i)
        except BaseException as e:  # reported below, with the thread's call
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == list(range(len(CALLS)))
    for i, expected in enumerate(sequential):
        assert torch.equal(results[i], expected), f"call {i} {CALLS[i][:2]} differs when run in a thread"
    assert not torch.equal(sequential[0], sequential[6])  # the calls do differ: the comparison means something
    # the calls never touched the pipeline's own scheduler
    assert tiny_pipeline.scheduler is scheduler_before and dict(scheduler_before.config) == config_before
    assert scheduler_before.num_inference_steps is None


def test_threads_with_the_progress_bar_on(tiny_pipeline, capsys):
    """The progress bar is made per call (diffusers' progress_bar copies its config): bars in threads don't mix."""
    tiny_pipeline.set_progress_bar_config(disable=False, desc="sampling")
    expected = one_call(tiny_pipeline, 1)
    results = [None, None]

    def worker(k: int) -> None:
        results[k] = one_call(tiny_pipeline, 1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None and torch.equal(r, expected) for r in results)
    assert capsys.readouterr().err.count("3/3") >= 3


def test_set_sampler_while_other_threads_sample(tiny_pipeline):
    """A call reads the pipeline's scheduler once: swapping it meanwhile affects later calls, never a running one."""
    expected = tiny_pipeline("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                             output_type="pt").images  # ddim, the tiny pipeline's own  # fmt: skip
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            for name in ("euler_a", "dpm++", "ddim"):
                tiny_pipeline.set_sampler(name)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(5):
            out = tiny_pipeline("a cat", num_inference_steps=3, sampler="ddim",
                                generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
            assert torch.equal(out, expected)
    finally:
        stop.set()
        thread.join()


def test_calls_are_serialized_when_offload_hooks_move_weights(tiny_pipeline, monkeypatch):
    """With accelerate/diffusers offload hooks, one call's hooks would move weights away under another's feet:
    such a pipeline runs one call at a time (and frees its hooks after each, as diffusers does)."""
    import time

    active, most = [0], [0]
    real_sample = LatentDiffusionPipeline._sample

    def counting_sample(self, plan):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return real_sample(self, plan)
        finally:
            active[0] -= 1

    monkeypatch.setattr(LatentDiffusionPipeline, "_sample", counting_sample)

    def run_four() -> None:
        threads = [threading.Thread(target=one_call, args=(tiny_pipeline, k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    run_four()
    assert most[0] > 1  # without hooks the calls do overlap
    most[0] = 0
    tiny_pipeline.unet._hf_hook = object()  # what accelerate's cpu_offload leaves on a module
    try:
        run_four()
    finally:
        del tiny_pipeline.unet._hf_hook
    assert most[0] == 1
