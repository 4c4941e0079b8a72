"""train_ldm.py --lora_rank: LoRA fine-tuning of a pretrained pipeline folder on tiny CPU models. Only the adapters
train (the base weights come out bit-identical), the output is a pytorch_lora_weights.safetensors that diffusers'
load_lora_weights and our load_loras (generate.py --lora) read and that changes the images, a run stopped at a
mid-epoch checkpoint and resumed ends with the same weights as a straight run, and bad input is one `error:` line
before anything is written."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import ldm_helpers
from ldm_helpers import CONFIG, ROOT, kill_after_first_checkpoint, max_abs_diff, weights


from ldm_app.errors import run_cli
from ldm_app.training.lora import LORA_FILE
from ldm_app.training.ldm import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# 8 images, batch 2, accumulation 2: 2 optimisation steps an epoch, so checkpoint-3 is mid-epoch (epoch 1, batch 2)
STEPS = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2")


def lora_args(ldm_files, base, out, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--train_data_dir", str(ldm_files.data), "--pretrained_model", str(base),
            "--output_dir", str(out), "--lora_rank", "4", "--cache_latents", "--set", "train.learning_rate=1e-2",
            *extra]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def straight(ldm_files, tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "straight"
    torch.set_num_threads(1)
    result = main(lora_args(ldm_files, tiny_pipeline_dir, out, *STEPS, "--validation_prompts", "a red circle"))
    reset_accelerate()
    return out, result


def base_name(key: str) -> str:
    return key.replace(".base_layer.", ".")



def assert_refused_in_one_line(argv: list[str], capsys, words, out) -> None:
    """train_ldm.py with `argv`: exit 2, one "error: " line naming each of `words`, no output folder."""
    ldm_helpers.assert_refused_in_one_line(main, argv, capsys, out, *words)


def test_only_the_lora_weights_train(straight, tiny_pipeline_dir):
    out, result = straight
    assert result.step == 6
    base = weights(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    trained = weights(out / "checkpoint-6" / "model.safetensors")  # accelerate's state: the U-Net with adapters
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    frozen = {base_name(k): v for k, v in trained.items() if "lora_" not in k}
    assert lora and frozen.keys() == base.keys()
    assert max_abs_diff(frozen, base) == 0  # bit-identical
    assert all(".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out.0." in k for k in lora)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0  # B starts at 0: it trained
    assert not (out / "checkpoint-6" / "model_1.safetensors").exists()  # the text encoder is not in the state
    # the optimiser holds the adapters only
    opt = torch.load(out / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert len(opt["state"]) == len(lora)


def test_the_output_is_a_lora_file_and_the_run_config(straight, tiny_pipeline_dir):
    out, _ = straight
    assert (out / LORA_FILE).is_file() and (out / "checkpoint-3" / LORA_FILE).is_file()
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert not (out / "checkpoint-3" / "unet").exists()
    assert (out / "validation" / "step-0000006.png").is_file()  # sampled with the adapters on
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["lora"]["rank"] == 4 and cfg["ldm"]["pretrained_model"] == str(tiny_pipeline_dir)
    # the exported file holds the EMA of the adapters (as a full run's pipeline holds the EMA U-Net)
    ema = weights(out / "checkpoint-6" / "ema.safetensors")
    assert ema and all(k.startswith("unet.") and "lora_" in k for k in ema)
    lora = weights(out / LORA_FILE)
    assert len(lora) == len(ema) and all(k.startswith("unet.") for k in lora)


def sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return torch.from_numpy(pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images)


def test_diffusers_and_generate_load_the_lora_and_it_changes_the_images(straight, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from ldm_app.adapters import load_loras
    from ldm_app.pipeline import LatentDiffusionPipeline

    out, _ = straight
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    before = sample(pipe)
    pipe.load_lora_weights(out)  # the folder: diffusers finds pytorch_lora_weights.safetensors itself
    with_lora = sample(pipe)
    assert (with_lora - before).abs().max() > 1e-3

    ours = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    load_loras(ours, [(out / LORA_FILE, 1.0)])  # what generate.py --lora FILE:1 does
    assert (sample(ours) - with_lora).abs().max() < 1e-4


def test_resumed_run_ends_with_the_same_lora_weights(straight, ldm_files, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "resumed"
    first = main(lora_args(ldm_files, tiny_pipeline_dir, out, *STEPS[:1], "3", *STEPS[2:]))  # stops at step 3
    reset_accelerate()
    assert first.step == 3 and not (out / "checkpoint-6").exists()
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 2)  # mid-epoch
    result = main(lora_args(ldm_files, tiny_pipeline_dir, out, *STEPS, "--resume_from_checkpoint", "latest"))
    assert result.step == 6 and len(result.losses) == 3
    for name in ("model.safetensors", "ema.safetensors", LORA_FILE):
        a, b = weights(straight[0] / "checkpoint-6" / name), weights(out / "checkpoint-6" / name)
        assert max_abs_diff(a, b) <= 1e-6, name
    assert max_abs_diff(weights(straight[0] / LORA_FILE), weights(out / LORA_FILE)) <= 1e-6
    # and the straight run's adapters did move between the checkpoints (the comparison is not vacuous)
    assert max_abs_diff(weights(straight[0] / "checkpoint-3" / LORA_FILE), weights(out / LORA_FILE)) > 1e-4


def test_resume_after_sigkill_ends_with_the_same_lora_weights(straight, ldm_files, tiny_pipeline_dir, tmp_path):
    killed = tmp_path / "killed"
    argv = lora_args(ldm_files, tiny_pipeline_dir, killed, *STEPS, "--validation_prompts", "a red circle")
    kill_after_first_checkpoint([sys.executable, str(ROOT / "train_ldm.py"), *argv], killed, tmp_path / "killed.log")
    assert not (killed / LORA_FILE).exists()  # killed before the end
    result = main([*argv, "--resume_from_checkpoint", "latest"])
    assert result.step == 6 and len(result.losses) < 6  # resumed from a checkpoint
    for name in ("model.safetensors", "ema.safetensors", LORA_FILE):
        a, b = weights(straight[0] / "checkpoint-6" / name), weights(killed / "checkpoint-6" / name)
        assert max_abs_diff(a, b) <= 1e-6, name
    assert max_abs_diff(weights(straight[0] / LORA_FILE), weights(killed / LORA_FILE)) <= 1e-6


def test_text_encoder_lora(ldm_files, tiny_pipeline_dir, tmp_path):
    """--lora_text_encoder: adapters on the text encoder's attention too (added by peft itself: transformers'
    add_adapter refuses this peft), frozen base weights, one file with both parts that diffusers' load_lora_weights
    and our load_loras read, and a run stopped at step 1 and resumed that ends where a straight run does."""
    from diffusers import StableDiffusionPipeline

    from ldm_app.adapters import load_loras
    from ldm_app.pipeline import LatentDiffusionPipeline

    def argv(out, *extra):
        return lora_args(ldm_files, tiny_pipeline_dir, out, "--lora_text_encoder", "--max_train_steps", "2",
                         "--checkpointing_steps", "1", *extra)

    out = tmp_path / "te"
    main(argv(out))
    reset_accelerate()
    state = weights(out / "checkpoint-2" / "model_1.safetensors")  # the text encoder, with its adapters
    base = weights(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    frozen = {base_name(k): v for k, v in state.items() if "lora_" not in k}
    assert max_abs_diff({k: frozen[k] for k in base}, base) == 0
    te_lora = {k: v for k, v in state.items() if "lora_B" in k}
    assert te_lora and max(v.abs().max().item() for v in te_lora.values()) > 0  # B starts at 0: it trained
    lora = weights(out / LORA_FILE)
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    states = lambda p: p.encode_prompt("a red circle", "cpu", 1, False)[0]  # noqa: E731
    with torch.no_grad():
        before = states(pipe)
        pipe.load_lora_weights(out)
        assert pipe.get_list_adapters().keys() == {"unet", "text_encoder"}
        diffusers_states = states(pipe)
        assert (diffusers_states - before).abs().max() > 1e-4  # the text encoder's part does something
        ours = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
        load_loras(ours, [(out / LORA_FILE, 1.0)])  # generate.py --lora
        assert (states(ours) - diffusers_states).abs().max() < 1e-5

    resumed = tmp_path / "resumed"
    main(argv(resumed, "--max_train_steps", "1"))
    reset_accelerate()
    main(argv(resumed, "--resume_from_checkpoint", "latest"))
    reset_accelerate()
    assert max_abs_diff(weights(out / LORA_FILE), weights(resumed / LORA_FILE)) <= 1e-6
    assert max_abs_diff(weights(out / "checkpoint-1" / LORA_FILE), weights(out / LORA_FILE)) > 1e-4  # it moved


@pytest.mark.parametrize("case", ["rank_zero", "rank_negative", "no_pretrained_model", "inpaint_widening",
                                  "scalar_embedding", "alpha_without_rank", "unknown_target_module"])
def test_bad_lora_input_is_one_line_before_anything_is_written(case, ldm_files, tiny_pipeline_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    argv = lora_args(ldm_files, tiny_pipeline_dir, out)
    words = {"rank_zero": ["--lora_rank", "got 0"], "rank_negative": ["--lora_rank", "got -2"],
             "no_pretrained_model": ["--pretrained_model"], "inpaint_widening": ["concat=inpaint"],
             "scalar_embedding": ["scalar"], "alpha_without_rank": ["--lora_rank"],
             "unknown_target_module": ["lora.target_modules", "to_qq"]}[case]
    if case in ("rank_zero", "rank_negative"):
        argv[argv.index("--lora_rank") + 1] = "0" if case == "rank_zero" else "-2"
    elif case == "no_pretrained_model":
        argv[argv.index("--pretrained_model")] = "--pretrained_vae"
        argv[argv.index("--pretrained_vae") + 1] = str(ldm_files.vae)
    elif case == "inpaint_widening":
        argv[argv.index("--cache_latents")] = "--set=conditioning.concat=inpaint"
    elif case == "scalar_embedding":
        argv += ["--set", "conditioning.kind=scalar"]
    elif case == "unknown_target_module":
        argv += ["--set", "lora.target_modules=[to_qq]"]
    elif case == "alpha_without_rank":
        i = argv.index("--lora_rank")
        argv[i:i + 2] = ["--lora_alpha", "8"]
    assert_refused_in_one_line(argv, capsys, words, out)
    shutil.rmtree(tmp_path / "latent_cache", ignore_errors=True)


def test_a_run_saved_before_lora_existed_still_resumes(ldm_files, tmp_path):
    from ldm_helpers import run_args

    out = tmp_path / "out"
    main(run_args(ldm_files, out, "--max_train_steps", "1", "--checkpointing_steps", "1"))
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["lora"]["rank"] is None
    del saved["lora"]  # as written by the previous version
    (out / "run_config.json").write_text(json.dumps(saved))
    reset_accelerate()
    result = main(run_args(ldm_files, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert result.step == 2


# ---- textual inversion (--train_embedding) -------------------------------------------------------------------

TOKEN = "<shape>"


@pytest.fixture(scope="module")
def token_data(ldm_files, tmp_path_factory):
    """The 8 renders with TOKEN in every caption (in place of the shape's name)."""
    folder = tmp_path_factory.mktemp("ti") / "data"
    shutil.copytree(ldm_files.data, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["text"] = " ".join(TOKEN if w in ("circle", "square", "triangle") else w for w in row["text"].split())
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def ti_args(data, base, out, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--train_data_dir", str(data), "--pretrained_model", str(base),
            "--output_dir", str(out), "--train_embedding", TOKEN, "--cache_latents",
            "--set", "train.learning_rate=5e-2", *extra]


@pytest.fixture(scope="module")
def ti_straight(token_data, tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "straight"
    torch.set_num_threads(1)
    result = main(ti_args(token_data, tiny_pipeline_dir, out, *STEPS, "--validation_prompts", f"a red {TOKEN}"))
    reset_accelerate()
    return out, result


def test_textual_inversion_trains_only_the_new_vector(ti_straight, tiny_pipeline_dir):
    from transformers import CLIPTokenizer

    out, result = ti_straight
    assert result.step == 6
    base = weights(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    state = weights(out / "checkpoint-6" / "model.safetensors")  # the text encoder: the U-Net is not trained at all
    assert not (out / "checkpoint-6" / "model_1.safetensors").exists()
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    assert max_abs_diff({k: v for k, v in state.items() if k != key}, {k: v for k, v in base.items() if k != key}) == 0
    old, new = base[key], state[key]
    assert new.shape[0] == old.shape[0] + 1 and torch.equal(new[:-1], old)  # every other row bit-identical
    star = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer").convert_tokens_to_ids("*</w>")
    assert (new[-1] - old[star]).abs().max() > 1e-3  # moved away from its initializer
    embeds = weights(out / "learned_embeds.safetensors")
    assert list(embeds) == [TOKEN] and embeds[TOKEN].shape == (1, old.shape[1])
    assert (out / "checkpoint-3" / "learned_embeds.safetensors").is_file() and not (out / "unet").exists()
    assert json.loads((out / "run_config.json").read_text())["embedding"]["token"] == TOKEN
    assert (out / "validation" / "step-0000006.png").is_file()


def test_diffusers_and_generate_load_the_embedding(ti_straight, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from ldm_app.adapters import load_embeddings
    from ldm_app.pipeline import LatentDiffusionPipeline

    out, _ = ti_straight
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    initial = pipe("a red *", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_textual_inversion(out)  # the folder: diffusers finds learned_embeds.safetensors itself
    learned = pipe(f"a red {TOKEN}", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(learned - initial).max() > 1e-3

    ours = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    ours.set_progress_bar_config(disable=True)
    load_embeddings(ours, [out / "learned_embeds.safetensors"], [TOKEN])  # generate.py --embedding
    again = ours(f"a red {TOKEN}", generator=torch.Generator().manual_seed(0), guidance_scale=7.5, **kwargs).images
    assert abs(again - learned).max() < 1e-4


def test_textual_inversion_resumes_exactly(ti_straight, token_data, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "resumed"
    main(ti_args(token_data, tiny_pipeline_dir, out, *STEPS[:1], "3", *STEPS[2:]))
    reset_accelerate()
    result = main(ti_args(token_data, tiny_pipeline_dir, out, *STEPS, "--resume_from_checkpoint", "latest"))
    assert result.step == 6 and len(result.losses) == 3
    for name in ("model.safetensors", "ema.safetensors", "learned_embeds.safetensors"):
        a, b = weights(ti_straight[0] / "checkpoint-6" / name), weights(out / "checkpoint-6" / name)
        assert max_abs_diff(a, b) <= 1e-6, name


def test_multi_vector_embedding(token_data, tiny_pipeline_dir, tmp_path):
    """--num_vectors 3: the token stands for 3 new rows (diffusers' `<shape> <shape>_1 <shape>_2`), all three train
    and nothing else does, the file is {token: (3, D)}, and diffusers' loader and ours read it to the same images,
    which differ from the first vector alone (so the training saw all three)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ldm_app.adapters import load_embeddings
    from ldm_app.pipeline import LatentDiffusionPipeline

    out = tmp_path / "multi"
    result = main(ti_args(token_data, tiny_pipeline_dir, out, *STEPS, "--num_vectors", "3"))
    reset_accelerate()
    assert result.step == 6
    base = weights(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    old, new = base[key], weights(out / "checkpoint-6" / "model.safetensors")[key]
    assert new.shape[0] == old.shape[0] + 3 and torch.equal(new[:-3], old)
    vectors = weights(out / "learned_embeds.safetensors")[TOKEN]
    assert vectors.shape == (3, old.shape[1])  # the EMA's vectors, as the checkpoint's copy
    assert torch.equal(vectors, weights(out / "checkpoint-6" / "learned_embeds.safetensors")[TOKEN])
    star = old[CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer").convert_tokens_to_ids("*</w>")]
    assert all((row - star).abs().max() > 1e-3 for row in new[-3:])  # every vector trained
    assert min((vectors[i] - vectors[j]).abs().max() for i in range(3) for j in range(i)) > 1e-4  # each its own
    assert json.loads((out / "run_config.json").read_text())["embedding"]["num_vectors"] == 3

    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=7.5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(out)
    assert pipe.maybe_convert_prompt(f"a red {TOKEN}", pipe.tokenizer) == f"a red {TOKEN} {TOKEN}_1 {TOKEN}_2"
    theirs = pipe(f"a red {TOKEN}", generator=torch.Generator().manual_seed(0), **kwargs).images

    ours = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    ours.set_progress_bar_config(disable=True)
    load_embeddings(ours, [out / "learned_embeds.safetensors"], [TOKEN])
    again = ours(f"a red {TOKEN}", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(again - theirs).max() < 1e-4
    one = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    one.set_progress_bar_config(disable=True)
    one.load_textual_inversion({TOKEN: vectors[:1]}, token=TOKEN)
    alone = one(f"a red {TOKEN}", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(alone - theirs).max() > 1e-3


@pytest.mark.parametrize("case", ["known_word", "not_in_captions", "with_lora", "no_pretrained_model",
                                  "long_initializer", "spaces", "num_vectors"])
def test_bad_embedding_input_is_one_line(case, token_data, ldm_files, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ti_args(token_data, tiny_pipeline_dir, out)
    words = {"known_word": ["circle", "already"], "not_in_captions": ["no caption", TOKEN],
             "with_lora": ["--lora_rank"], "no_pretrained_model": ["--pretrained_model"],
             "long_initializer": ["initializer"], "spaces": ["one word"], "num_vectors": ["num_vectors", "1 to 16"]}[case]
    i = argv.index("--train_embedding")
    if case == "known_word":  # in the original captions, so only the tokenizer check refuses it
        argv[i + 1] = "circle"
        argv[argv.index("--train_data_dir") + 1] = str(ldm_files.data)
    elif case == "not_in_captions":
        argv[argv.index("--train_data_dir") + 1] = str(ldm_files.data)
    elif case == "with_lora":
        argv += ["--lora_rank", "4"]
    elif case == "no_pretrained_model":
        j = argv.index("--pretrained_model")
        argv[j:j + 2] = ["--pretrained_vae", str(ldm_files.vae)]
    elif case == "long_initializer":
        argv += ["--initializer_token", "red circle"]
    elif case == "spaces":
        argv[i + 1] = "my style"
    elif case == "num_vectors":
        argv += ["--num_vectors", "0"]
    assert_refused_in_one_line(argv, capsys, words, out)


def test_the_lora_knows_its_caption_words(straight, tiny_pipeline_dir, tmp_path):
    """A LoRA run writes its captions' words beside the LoRA file; loaded, they no longer count as "words unknown
    to this model" (a new concept's name is what a LoRA teaches), and unloading forgets them again."""
    from ldm_app.adapters import load_loras, unload_loras
    from ldm_app.pipeline import LatentDiffusionPipeline
    from ldm_app.vocabulary import Vocabulary

    out, _ = straight
    learned = Vocabulary.read(out)
    assert learned is not None and {"red", "circle"} <= learned.words
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    Vocabulary(frozenset({"a"}), 1).write(base)  # a base model that knows one word
    pipe = LatentDiffusionPipeline.from_pretrained(base)
    assert pipe.unknown_words_note("a red circle") == "words unknown to this model: red, circle"
    load_loras(pipe, [(out / LORA_FILE, 1.0)])
    assert pipe.unknown_words_note("a red circle") is None
    assert pipe.unknown_words_note("a red corgi") == "words unknown to this model: corgi"
    unload_loras(pipe)
    assert pipe.unknown_words_note("a red circle") == "words unknown to this model: red, circle"


def test_the_caption_words_are_counted_once_a_run(ldm_files, tiny_pipeline_dir, tmp_path, monkeypatch):
    """Two checkpoints and the final LoRA each write vocabulary.json; the captions are read for it once."""
    from ldm_app.vocabulary import Vocabulary

    counted = []
    original = Vocabulary.from_captions.__func__
    monkeypatch.setattr(Vocabulary, "from_captions",
                        classmethod(lambda cls, captions: counted.append(1) or original(cls, captions)))
    out = tmp_path / "run"
    main(lora_args(ldm_files, tiny_pipeline_dir, out, *STEPS))
    reset_accelerate()
    written = [out / "checkpoint-3", out / "checkpoint-6", out]
    assert all(Vocabulary.read(folder) == Vocabulary.read(out) for folder in written)
    assert Vocabulary.read(out) is not None and len(counted) == 1
