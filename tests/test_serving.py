"""The serving core shared by the web UI and the A1111 API (ldm_app.serving): catalogs by name, the queue's order,
bound, cancel and interrupt, client images, and that a served job makes what generate.py makes."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from ldm_app import generate
from ldm_app.errors import UserError
from ldm_app.pngmeta import read_params
from ldm_app.serving import (
    GenerationService,
    JobCancelled,
    JobSpec,
    ModelCatalog,
    QueueFull,
    ServerConfig,
    decode_base64,
    decode_image,
)

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def models_dir(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_pipeline_dir, root / "tiny")
    shutil.copytree(tiny_pipeline_dir, root / "nested" / "tiny2")
    (root / "notes.txt").write_text("not a model")
    return root


@pytest.fixture
def service(models_dir, tmp_path):
    svc = GenerationService(ServerConfig(models_dir=str(models_dir), model="tiny", outputs_dir=str(tmp_path / "out"),
                                         max_queue=3))  # fmt: skip
    yield svc
    svc.close()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_catalog_offers_names_and_refuses_paths(models_dir, tmp_path):
    catalog = ModelCatalog(models_dir)
    names = catalog.names()
    assert "tiny" in names and "nested/tiny2" in names and "notes.txt" not in names
    assert catalog.path("nested/tiny2") == (models_dir / "nested" / "tiny2").resolve()
    for bad in ("../tiny", str(models_dir / "tiny"), "/etc/passwd", "nested", 3):
        with pytest.raises(UserError, match="unknown model"):
            catalog.path(bad)
    with pytest.raises(UserError, match="no such folder"):
        ModelCatalog(tmp_path / "missing")


def test_served_job_equals_generate_py(service, tmp_path):
    """The same seed and settings through the queue and through generate() give the same pixels, and the saved PNG
    records the parameters (so --from_png can remake it)."""
    result = service.run(JobSpec(PROMPT, seed=7, steps=3, batch_size=2, n_iter=2), timeout=120)
    assert [p.seed for p in result.params] == [7, 8, 9, 10]
    assert len(result.images) == len(result.paths) == 4 and not result.interrupted
    assert all(str(p).startswith(str(service.outputs_dir)) for p in result.paths)
    # The second batch (seeds 9, 10) made directly with the same batch layout: the same pixels. (A batch of one can
    # differ in the last bit, as CPU kernels round differently for another batch size.)
    direct = generate.generate(
        PROMPT, service.catalog.path("tiny"), seed=9, steps=3, num_images=2, batch_size=2, output=tmp_path / "direct"
    )
    for served, path in zip(result.images[2:], direct, strict=True):
        np.testing.assert_array_equal(np.asarray(served), np.asarray(Image.open(path).convert("RGB")))
    assert read_params(result.paths[0]).seed == 7


def test_unsaved_job_writes_nothing(service):
    result = service.run(JobSpec(PROMPT, seed=1, steps=2, save=False), timeout=120)
    assert len(result.images) == 1 and result.paths == []
    assert not service.outputs_dir.exists()


def test_bad_requests_are_refused_before_the_queue(service):
    image = Image.new("RGB", (64, 64), "white")
    cases = {
        "empty": JobSpec("   "),
        "unknown model": JobSpec(PROMPT, model="../tiny"),
        "size": JobSpec(PROMPT, width=60),
        "huge": JobSpec(PROMPT, width=1 << 20),
        "sampler": JobSpec(PROMPT, sampler="k_lms_x"),
        "batch": JobSpec(PROMPT, batch_size=0),
        "steps": JobSpec(PROMPT, steps=10**9),
        "guidance": JobSpec(PROMPT, guidance_scale=float("nan")),
        "mask size": JobSpec(PROMPT, init_image=image, mask=Image.new("L", (32, 32), 255)),
        "mask alone": JobSpec(PROMPT, mask=Image.new("L", (64, 64), 255)),
        "lora": JobSpec(PROMPT, loras=(("nope", 1.0),)),
        "strength": JobSpec(PROMPT, init_image=image, strength=1.5),
        "inpaint method": JobSpec(PROMPT, init_image=image, mask=Image.new("L", (64, 64), 255), inpaint="magic"),
    }
    for name, spec in cases.items():
        with pytest.raises(UserError) as info:
            service.submit(spec)
        assert "\n" not in str(info.value), name
    assert service.queue_length() == 0
    assert not service.outputs_dir.exists()  # not even the input images of a refused edit


def test_an_image_cut_short_by_an_interrupt_is_returned_but_never_saved(service, tmp_path):
    """Its parameters (all the steps) would not remake it: the PNG would say what it is not."""
    job = service.submit(JobSpec(PROMPT, seed=5, steps=400, batch_size=1, n_iter=3))  # saved, as the web UI's
    deadline = time.monotonic() + 60
    while (service.progress()["job"] or {}).get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.interrupt()
    result = job.future.result(timeout=120)
    assert result.interrupted and result.partial_images == 1 and len(result.images) == 1
    assert result.paths == [] and not list((tmp_path / "out").rglob("*.png"))


def test_queue_order_bound_cancel_and_interrupt(service):
    long = JobSpec(PROMPT, steps=40, n_iter=20, save=False)
    first = service.submit(long)
    deadline = time.monotonic() + 60
    while service.progress()["job"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = service.submit(JobSpec(PROMPT, seed=3, steps=2, save=False))
    third = service.submit(JobSpec(PROMPT, seed=4, steps=2, save=False))
    with pytest.raises(QueueFull, match="queue is full"):
        service.submit(JobSpec(PROMPT, steps=2))
    assert service.position(second) == 1 and service.position(third) == 2
    service.cancel(third)
    with pytest.raises(JobCancelled):
        third.future.result(timeout=5)
    progress = service.progress()
    assert progress["busy"] and progress["job"]["id"] == first.id and progress["queued"] == 1
    assert service.interrupt()
    interrupted = first.future.result(timeout=60)
    assert interrupted.interrupted and len(interrupted.images) < 20
    assert second.future.result(timeout=60).params[0].seed == 3  # the next job ran after the interrupted one
    assert not service.interrupt()


def test_progress_reports_steps_of_repaint(service):
    """RePaint (our own loop) reports its steps through callback_on_step_end like diffusers' loops do."""
    image = Image.new("RGB", (64, 64), "white")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = service.submit(JobSpec(PROMPT, seed=1, steps=10, init_image=image, mask=mask, inpaint="repaint", save=False))
    seen = []
    while not job.future.done():
        snapshot = service.progress()["job"]
        if snapshot:
            seen.append((snapshot["step"], snapshot["steps"]))
        time.sleep(0.002)
    result = job.future.result()
    assert result.params[0].inpaint == "repaint" and result.params[0].mask.startswith(str(service.outputs_dir))
    assert job.steps > 10  # RePaint's schedule with its jumps back: more entries than steps
    assert job.step == job.steps or job.step == 0  # the last step was reported (0: reset after the image)
    assert seen and all(0 <= step <= total for step, total in seen)


def test_client_images(tmp_path):
    png = _png_bytes(Image.new("RGB", (16, 8), "red"))
    assert decode_image(decode_base64("data:image/png;base64," + base64.b64encode(png).decode(), "x"), "x").size == (16, 8)
    for bad in ("not base64!", 12):
        with pytest.raises(UserError):
            decode_base64(bad, "init_images[0]")
    with pytest.raises(UserError, match="not a readable image"):
        decode_image(b"GIF89a garbage", "init_images[0]")
    # a decompression bomb: a valid header claiming 30000 x 30000 pixels is refused before any pixel is decoded
    def png_claiming(side: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    with pytest.raises(UserError, match="decompression bomb"):  # Pillow's own refusal
        decode_image(png_claiming(30000), "init_images[0]")
    with pytest.raises(UserError, match="4000x4000 pixels, above the limit of 2048"):  # ours, from the header
        decode_image(png_claiming(4000), "init_images[0]")


def test_concurrent_submitters_are_served_in_queue_order(models_dir, tmp_path):
    svc = GenerationService(ServerConfig(models_dir=str(models_dir), model="tiny", outputs_dir=str(tmp_path), max_queue=16))
    jobs = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with lock:  # submission order as the queue saw it
            job = svc.submit(JobSpec(PROMPT, seed=k, steps=2, save=False))
            jobs.append(job)
        job.future.result(timeout=120)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    svc.close()
    assert len(jobs) == 8 and all(job.future.done() and not job.future.exception() for job in jobs)
    started = sorted(jobs, key=lambda job: job.started)
    assert [job.id for job in started] == [job.id for job in jobs]  # one worker, FIFO: run in the order submitted


def test_model_side_errors_name_fields_not_flags(service, monkeypatch):
    """Errors raised in the worker (the checks that need the model) read like the submit-time ones: field names,
    not generate.py's flags; the exception keeps its type."""
    class ModelSideError(UserError):
        pass

    def failing_run(job):
        raise ModelSideError("--steps 900 for sampler ddim is above the model's 100 training timesteps (see --help)")

    monkeypatch.setattr(service, "_run", failing_run)
    job = service.submit(JobSpec(PROMPT, steps=2, save=False))
    with pytest.raises(ModelSideError) as info:
        job.future.result(timeout=30)
    assert str(info.value) == "steps 900 for sampler ddim is above the model's 100 training timesteps (see help)"


def test_a_served_model_samples_as_its_ldm_app_json_says_now(tiny_pipeline_dir, tmp_path):
    """A loaded model whose stored defaults change on disk (e.g. `evaluate sweep --write_defaults` into a served
    folder) samples with the new ones from the next job on, as generate.py would; and a job's own grid, or the
    sampler's own spacing, wins over the stored grid."""
    from ldm_app.pipeline import write_sampling_defaults

    shutil.copytree(tiny_pipeline_dir, tmp_path / "models" / "m")
    svc = GenerationService(ServerConfig(models_dir=str(tmp_path / "models"), model="m",
                                         outputs_dir=str(tmp_path / "out")))  # fmt: skip
    try:
        before = svc.run(JobSpec(PROMPT, seed=1, save=False), timeout=120).params[0]
        assert before.timesteps is None
        write_sampling_defaults(tmp_path / "models" / "m", {"num_inference_steps": 3, "sampler": "euler",
                                                             "timesteps": [900, 500, 100]})  # fmt: skip
        after = svc.run(JobSpec(PROMPT, seed=1, save=False), timeout=120).params[0]
        assert (after.steps, after.sampler, after.timesteps) == (3, "euler", (900, 500, 100))
        own = svc.run(JobSpec(PROMPT, seed=1, own_spacing=True, save=False), timeout=120).params[0]
        assert own.steps == 3 and own.timesteps is not None and own.timesteps != (900, 500, 100)
        asked = svc.run(JobSpec(PROMPT, seed=1, steps=3, timesteps=(800, 400, 50), save=False), timeout=120)
        assert asked.params[0].timesteps == (800, 400, 50)
        with pytest.raises(UserError, match="^timesteps must be strictly decreasing"):
            svc.submit(JobSpec(PROMPT, steps=2, timesteps=(100, 500)))
    finally:
        svc.close()
