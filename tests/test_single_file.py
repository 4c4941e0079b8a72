"""Single-file SD-1.x checkpoints (ldm_app.single_file, `python -m ldm_app.export --single_file`).

A random-weight model of the full SD-1.x shape (860M-parameter U-Net, 84M VAE, 123M CLIP ViT-L/14 text encoder;
fp16 on disk) is built once for the module as a diffusers folder from the shipped configs. Then: folder -> single
file -> pipeline gives the folder's image; the keys we write are what diffusers' own converters read back to the
folder's exact tensors; bad files are one UserError line; .ckpt is weights-only. Malformed files are written as
sparse files (a real header, zero pages) so that they cost nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_app import single_file as sf
from ldm_app.errors import UserError, run_cli
from ldm_app.export import main as export_main
from ldm_app.models import TOKENIZER_DIR

PROMPT = "a large red circle in the center on a white background"
POOL = 16_777_213  # a prime: tensors cut from one random pool at random offsets share no alignment


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()  # conftest sets 1 for the tiny models; a full-size U-Net wants both cores
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _random_state(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fp16 weights for every tensor of `model` (a meta-device model): N(0, 1/fan_in) for matrices and kernels,
    1 +- 0.02 for norm scales, +-0.02 for biases. Cut from one random pool: randn per tensor took 3x longer."""
    pool = torch.randn(POOL, generator=gen)
    pool = torch.cat([pool, pool])
    out = {}
    for key, meta in model.state_dict().items():
        n = meta.numel()
        start = int(torch.randint(0, POOL, (1,), generator=gen))
        t = (pool[start:start + n] if n <= POOL else pool.repeat(n // POOL + 1)[:n]).view(meta.shape)
        if meta.ndim >= 2:
            t = t * (1 / math.sqrt(meta[0].numel()))
        elif key.endswith("weight"):
            t = 1 + 0.02 * t
        else:
            t = 0.02 * t
        out[key] = t.half().contiguous()
    return out


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A full-size SD-1.x diffusers folder: the shipped configs (PNDM scheduler included) plus random fp16 weights."""
    folder = tmp_path_factory.mktemp("sd") / "model"
    shutil.copytree(sf.SD15_CONFIGS, folder)
    shutil.copytree(TOKENIZER_DIR, folder / "tokenizer")  # a whole pipeline folder (the configs ship without it)
    gen = torch.Generator().manual_seed(0)
    for component, model in sf._meta_models().items():
        save_file(_random_state(model, gen), str(folder / sf._FOLDER_WEIGHTS[component]))
    yield folder
    shutil.rmtree(folder.parent)  # 4 GB with the single file: not left for pytest's 3 kept runs


@pytest.fixture(scope="module")
def sd_file(sd_folder) -> Path:
    return sf.save_single_file(sd_folder, sd_folder.parent / "model.safetensors")


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    # 128 px is the smallest size our pipeline takes for an SD U-Net (latents 2x2 after its last downsampling);
    # guidance 1: one U-Net pass, and the text encoder still conditions the image
    return pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, height=128, width=128, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (HF_HUB_OFFLINE=1 is set by conftest)."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_single_file_gives_the_folders_image_and_round_trips(sd_folder, sd_file, no_network):
    # both in float32 to sample: fp16 convolutions are fast only on CPUs with fp16 units (AVX512-FP16 / AMX);
    # elsewhere (this AMD EPYC, AVX2) one 128 px step took over 10 minutes in fp16
    folder_pipe = StableDiffusionPipeline.from_pretrained(sd_folder, dtype=torch.float32, safety_checker=None)
    want = _image(folder_pipe)
    del folder_pipe
    assert want.shape == (1, 128, 128, 3) and want.std() > 0.02  # a real image, not a constant one

    pipe = sf.load_single_file(sd_file, StableDiffusionPipeline)  # float32, its default; offline, sockets refused
    assert pipe.unet.dtype == torch.float32
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.skip_prk_steps
    got = _image(pipe)
    assert np.abs(got - want).max() <= 2 / 255

    # round trip: the loaded pipeline written back gives exactly the file's keys and tensors (fp16 -> float32 ->
    # fp16 is exact)
    again = sf.to_single_file_state_dict(pipe)
    with safe_open(str(sd_file), "pt") as f:
        assert set(again) == set(f.keys())
        for key in again:
            stored = f.get_tensor(key)
            assert torch.equal(again[key].to(stored.dtype), stored), key


def test_default_pipeline_class_is_ours(sd_file, no_network):
    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = sf.load_single_file(sd_file)
    assert type(pipe) is LatentDiffusionPipeline
    # float32 by default, though the file is fp16: it runs on the CPU, like LatentDiffusionPipeline.from_pretrained
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    with safe_open(str(sd_file), "pt") as f:
        assert torch.equal(pipe.unet.conv_out.weight, f.get_tensor("model.diffusion_model.out.2.weight").float())
        assert torch.equal(pipe.vae.encoder.conv_in.weight,
                           f.get_tensor("first_stage_model.encoder.conv_in.weight").float())


def test_written_keys_are_what_diffusers_converters_read(sd_folder, sd_file):
    """diffusers' own original -> diffusers converters, on what we wrote, give the folder's exact tensors: the
    hand-written diffusers -> original mapping is its exact inverse."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    checkpoint = load_file(str(sd_file))
    assert len(checkpoint) == len(sf.expected_shapes()) == 686 + 248 + 196
    unet_config = json.loads((sd_folder / "unet" / "config.json").read_text())
    vae_config = json.loads((sd_folder / "vae" / "config.json").read_text())
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, unet_config),
        "vae": convert_ldm_vae_checkpoint(checkpoint, vae_config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }
    for component, rel in sf._FOLDER_WEIGHTS.items():
        folder_tensors = load_file(str(sd_folder / rel))
        assert set(converted[component]) == set(folder_tensors), component
        for key, tensor in folder_tensors.items():
            assert torch.equal(converted[component][key].reshape(tensor.shape), tensor), (component, key)


def same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors (names, dtypes, shapes, offsets) and the same data bytes; the header's JSON may list its entries
    in another order (safetensors writes them from a hash map)."""
    with a.open("rb") as fa, b.open("rb") as fb:
        headers = []
        for f in (fa, fb):
            n = int.from_bytes(f.read(8), "little")
            headers.append(json.loads(f.read(n)))
        if headers[0] != headers[1]:
            return False
        while True:
            block_a, block_b = fa.read(1 << 24), fb.read(1 << 24)
            if block_a != block_b:
                return False
            if not block_a:
                return True


def test_export_single_file_matches_and_refuses_bad_out(sd_folder, sd_file, tmp_path, capsys):
    out = tmp_path / "exported" / "sd.safetensors"
    assert run_cli(export_main, ["--model", str(sd_folder), "--out", str(out), "--single_file"]) == 0
    # folder -> our pipeline -> fp16 single file is folder -> single file: same header, same data bytes
    assert same_safetensors(out, sd_file)
    assert [p.name for p in out.parent.iterdir()] == ["sd.safetensors"]  # no temporary file left
    out.write_bytes(b"now a user's file")  # (and 2 GB less on disk)

    for bad_out, words in [
        (out, "an existing file"),  # never replaced: nothing marks a file as an earlier export
        (tmp_path / "sd.ckpt", "ending .safetensors"),
        (tmp_path / "folder_export", "ending .safetensors"),
        (sd_folder / "inside.safetensors", "inside the model folder"),
    ]:
        capsys.readouterr()
        assert run_cli(export_main, ["--model", str(sd_folder), "--out", str(bad_out), "--single_file"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert out.read_bytes() == b"now a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert not (sd_folder / "inside.safetensors").exists()


# ---- a 9-channel (inpainting) U-Net, malformed files: sparse files with a real header ------------------------------


ITEM_BYTES = {"F16": 2, "F32": 4, "I32": 4, "I64": 8}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], fill: dict[str, torch.Tensor] = {},
                             dtype: str = "F16", cut: int = 0, dtypes: dict[str, str] = {}) -> Path:
    """A safetensors file with these names and shapes (in `dtype`, or `dtypes[name]`) whose data are zero pages (no
    disk, no time), except the fp16 tensors in `fill`; `cut` bytes removed from the end make it a truncated file."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * ITEM_BYTES[dtypes.get(key, dtype)]
        header[key] = {"dtype": dtypes.get(key, dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, tensor in fill.items():
            f.seek(8 + len(raw) + header[key]["data_offsets"][0])
            f.write(tensor.to(torch.float16).contiguous().numpy().tobytes())
        f.truncate(8 + len(raw) + offset - cut)
    return path


def test_nine_channel_unet_loads_with_in_channels_from_the_weights(tmp_path, no_network):
    shapes = dict(sf.expected_shapes())
    shapes[sf.CONV_IN] = (320, 9, 3, 3)
    # what real A1111 files hold besides the weights: ignored
    extras = {"cond_stage_model.transformer.text_model.embeddings.position_ids": ((1, 77), "I64"),
              "alphas_cumprod": ((1000,), "F32"), "model_ema.decay": ((), "F32")}
    shapes.update({k: shape for k, (shape, _) in extras.items()})
    conv_in = torch.randn(320, 9, 3, 3, generator=torch.Generator().manual_seed(1)).half()
    path = write_sparse_safetensors(tmp_path / "inpainting.safetensors", shapes, {sf.CONV_IN: conv_in},
                                    dtypes={k: dtype for k, (_, dtype) in extras.items()})
    # fp16 kept: this test is about shapes, and a cast of a billion zeros would only cost time
    pipe = sf.load_single_file(path, StableDiffusionInpaintPipeline, dtype=torch.float16)
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    assert pipe.unet.config.in_channels == 9 and pipe.unet.conv_in.weight.shape == (320, 9, 3, 3)
    assert torch.equal(pipe.unet.conv_in.weight, conv_in)
    assert pipe.vae.config.in_channels == 3  # the override reached the U-Net only


def _one_line(path: Path, pipeline_class=StableDiffusionPipeline) -> str:
    with pytest.raises(UserError) as info:
        sf.load_single_file(path, pipeline_class)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _without(prefix: str) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in sf.expected_shapes().items() if not k.startswith(prefix)}


@pytest.mark.parametrize("case, words", [
    ("no_vae", "no VAE weights (first_stage_model.*"),
    ("sd2_text_encoder", "no text encoder weights (cond_stage_model.transformer.*"),
    ("one_missing", "1 of its 1130 tensors are missing (e.g. model.diffusion_model.out.2.bias)"),
    ("sd2_cross_attention", "has shape (320, 1024) where SD-1.x has (320, 768)"),
    ("integer_weights", "holds I32 values, not floating-point weights"),
    ("truncated", "truncated"),
    ("text_file", "not a readable safetensors file"),
    ("empty", "too short for a header"),
    ("wrong_suffix", "neither a .safetensors nor a .ckpt name"),
    ("missing_file", "does not exist"),
    ("not_a_ckpt", "not a readable .ckpt file"),
])
def test_bad_files_are_one_line(tmp_path, case, words):
    expected = sf.expected_shapes()
    path = tmp_path / f"{case}.safetensors"
    if case == "no_vae":
        write_sparse_safetensors(path, _without(sf.VAE_PREFIX))
    elif case == "sd2_text_encoder":  # SD 2.x: an OpenCLIP text encoder under cond_stage_model.model.*
        shapes = _without(sf.TEXT_PREFIX)
        shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
        write_sparse_safetensors(path, shapes)
    elif case == "one_missing":
        shapes = dict(expected)
        del shapes["model.diffusion_model.out.2.bias"]
        write_sparse_safetensors(path, shapes)
    elif case == "sd2_cross_attention":
        shapes = dict(expected)
        shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
        write_sparse_safetensors(path, shapes)
    elif case == "integer_weights":
        write_sparse_safetensors(path, expected, dtype="I32")
    elif case == "truncated":  # a download cut short: the header is whole, the data are not
        write_sparse_safetensors(path, expected, cut=4096)
    elif case == "text_file":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 2132625894\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "wrong_suffix":
        path = write_sparse_safetensors(tmp_path / "model.bin", expected)
    elif case == "not_a_ckpt":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"PK\x03\x04 not really a zip, nor a pickle")
    assert words in _one_line(path)


# ---- .ckpt: weights-only unpickling, never a plain unpickle --------------------------------------------------------

EXECUTED = []


class Payload:
    """Unpickling this runs code (__reduce__ -> a call): what a plain torch.load of an untrusted .ckpt would do."""

    def __reduce__(self):
        return (EXECUTED.append, ("payload ran",))


def test_ckpt_of_plain_tensors_loads(sd_file, tmp_path, no_network):
    checkpoint = load_file(str(sd_file))
    path = tmp_path / "model.ckpt"
    # the Lightning form of the original checkpoints: {"state_dict": {...}, "global_step": N}
    torch.save({"state_dict": checkpoint, "global_step": 470000}, path)
    del checkpoint
    pipe = sf.load_single_file(path, StableDiffusionPipeline, dtype=torch.float16)  # fp16: no cast, see above
    with safe_open(str(sd_file), "pt") as f:
        for key, param in [("model.diffusion_model.out.2.weight", pipe.unet.conv_out.weight),
                           ("first_stage_model.decoder.conv_out.weight", pipe.vae.decoder.conv_out.weight),
                           ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
                            pipe.text_encoder.final_layer_norm.weight)]:
            assert torch.equal(param, f.get_tensor(key)), key
    del pipe
    path.unlink()  # 2 GB


def test_ckpt_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callback": Payload()}, path)
    assert EXECUTED == []
    message = _one_line(path)
    assert "pickled Python objects besides tensors" in message and ".safetensors" in message
    assert EXECUTED == []  # refused, not executed


# ---- save_single_file refusals ---------------------------------------------------------------------------------------


def test_save_refuses_what_the_layout_cannot_hold(tmp_path, tiny_pipeline_dir):
    # our tiny test model: not SD-1.x shaped
    with pytest.raises(UserError) as info:
        sf.save_single_file(tiny_pipeline_dir, tmp_path / "tiny.safetensors")
    assert "\n" not in str(info.value) and "SD-1.x" in str(info.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="ending .safetensors"):
        sf.save_single_file(tiny_pipeline_dir, tmp_path / "tiny.ckpt")
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"a user's file")
    with pytest.raises(UserError, match="already exists; refusing to replace it"):
        sf.save_single_file(tiny_pipeline_dir, existing)
    assert existing.read_bytes() == b"a user's file"


def test_save_refuses_configs_the_file_cannot_record(sd_folder, tmp_path):
    """SD-1.x shapes, but a VAE scaling factor or v-prediction the single file cannot say: loading it back would
    give other images, so it is refused (before any weight is read)."""
    for rel, key, value in [("vae/config.json", "scaling_factor", 0.13025),
                            ("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),
                            ("unet/config.json", "attention_head_dim", 4)]:
        folder = tmp_path / key
        folder.mkdir()
        for entry in sd_folder.iterdir():  # the weights linked, the configs copied
            (folder / entry.name).symlink_to(entry) if entry.is_file() else None
        for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
            (folder / sub).mkdir()
            for entry in (sd_folder / sub).iterdir():
                if entry.name.endswith(".json"):
                    shutil.copy(entry, folder / sub / entry.name)
                else:
                    (folder / sub / entry.name).symlink_to(entry)
        config = json.loads((folder / rel).read_text())
        config[key] = value
        (folder / rel).write_text(json.dumps(config))
        with pytest.raises(UserError) as info:
            sf.save_single_file(folder, tmp_path / f"{key}.safetensors")
        assert "\n" not in str(info.value) and f"{key}={value!r}" in str(info.value), str(info.value)
        assert not (tmp_path / f"{key}.safetensors").exists()


def test_generate_cli_takes_a_single_file_model(sd_file, tmp_path, no_network):
    """`generate.py --model FILE.safetensors`: loads offline as our pipeline and records the file as the model."""
    from ldm_app.generate import main
    from ldm_app.pngmeta import read_params

    out = main(["a cat", "--model", str(sd_file), "--steps", "1", "--guidance_scale", "1", "--height", "128",
                "--width", "128", "--seed", "0", "--device", "cpu", "--output", str(tmp_path / "cat.png")])[0]  # fmt: skip
    p = read_params(out)
    assert p.model == str(sd_file.resolve()) and (p.height, p.width, p.steps) == (128, 128, 1)
