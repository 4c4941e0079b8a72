"""The opt-in new colours, shape and size of the shapes generator (--extra_colours, --extra_shapes, --extra_sizes)
and the pixel measures of ldm_app/evaluation/new_concept.py."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from ldm_app.data import shapes
from ldm_app.errors import UserError
from ldm_app.evaluation import judge as judge_mod
from ldm_app.evaluation.new_concept import (
    NONE,
    concept_palette,
    nearest_palette_colour,
    palette_with,
    pixel_colour,
    pixel_shape,
    pixel_size,
)


def _scene(i: int, **kw) -> shapes.Scene:
    return shapes.sample_scene(np.random.default_rng([5, i]), 64, **kw)


def test_new_colours_are_outside_the_vocabulary_and_apart_under_jitter():
    assert not set(shapes.EXTRA_COLOURS) & set(shapes.COLOURS)
    assert shapes.PALETTE == {**shapes.COLOURS, **shapes.EXTRA_COLOURS}
    assert shapes.EXTRA_COLOURS["pink"] and shapes.EXTRA_COLOURS["vermilion"]
    jitters = np.array(list(itertools.product((-shapes.COLOUR_JITTER, 0, shapes.COLOUR_JITTER), repeat=3)))
    for name, rgb in shapes.EXTRA_COLOURS.items():
        others = [*shapes.COLOURS.values(), *shapes.BACKGROUNDS.values()]
        assert min(np.linalg.norm(np.subtract(rgb, o)) for o in others) > 40, name
        # Every jittered draw of every colour a run about `name` can name (the cube's corners and faces are the
        # extremes) is still nearest to its own palette entry: the concept and its neighbours never swap names.
        palette = concept_palette(name)
        assert set(palette) == {*shapes.COLOURS, name}
        for colour, centre in palette.items():
            for j in jitters:
                assert nearest_palette_colour(np.add(centre, j), palette) == colour, (name, colour, j)
    # An off-red between red and vermilion is vermilion in a vermilion run, red in a pink run.
    off_red = (228, 72, 36)
    assert nearest_palette_colour(off_red, concept_palette("vermilion")) == "vermilion"
    assert nearest_palette_colour(off_red, concept_palette("pink")) == "red"


# From the generator before --extra_colours existed (python -m ldm_app.data.shapes --num_images 3 --seed 0).
PINNED_CAPTIONS = [
    "a large red triangle on the right on a gray background",
    "a large purple circle on the right on a black background",
    "a small yellow circle on the right on a gray background",
]
PINNED_SHA256 = "59ccc622f911fd0b531ad768df088d4b287e35bfd9269217f67ec465b38687bd"


def test_default_draws_unchanged(tmp_path):
    # Without --extra_colours, every scene is the one the generator drew before the flag existed: the captions and
    # the first image's bytes pinned from the generator before the change.
    out = shapes.make_dataset(tmp_path / "d", 3, 64, 0)
    captions = [json.loads(line)["text"] for line in (out / shapes.METADATA_FILE).read_text().splitlines()]
    assert captions == [shapes.caption(shapes.sample_scene(np.random.default_rng([0, i]), 64)) for i in range(3)]
    manifest = json.loads((out / shapes.MANIFEST_FILE).read_text())
    assert set(manifest["arguments"]) == {"num_images", "resolution", "seed", "two_object_fraction", "labels"}
    assert captions == PINNED_CAPTIONS
    assert manifest["files"]["000000.png"]["sha256"] == PINNED_SHA256
    # The explicit empty palette extension is the default, draw for draw.
    for i in range(50):
        assert _scene(i) == _scene(i, extra_colours=()) == _scene(i, extra_shapes=()) == _scene(i, extra_sizes=())



def test_extra_colour_appears_in_captions_and_pixels(tmp_path):
    out = shapes.make_dataset(tmp_path / "p", 40, 64, 3, two_object_fraction=0.25, extra_colours=["pink"],
                              extra_colour_fraction=0.5)
    rows = [json.loads(line) for line in (out / shapes.METADATA_FILE).read_text().splitlines()]
    pink = [r for r in rows if " pink " in r["text"]]
    assert 10 <= len(pink) <= 35
    manifest = json.loads((out / shapes.MANIFEST_FILE).read_text())
    assert manifest["arguments"]["extra_colours"] == ["pink"]
    scenes = [shapes.sample_scene(np.random.default_rng([3, i]), 64, 0.25, ("pink",), 0.5) for i in range(40)]
    for scene in scenes:
        for obj in scene.objects:
            if obj.colour == "pink":
                assert np.abs(np.subtract(obj.rgb, shapes.EXTRA_COLOURS["pink"])).max() <= shapes.COLOUR_JITTER
    one = [s for s in scenes if s.relation is None and s.objects[0].colour == "pink"]
    assert one and all(pixel_colour(np.asarray(shapes.render_scene(s, 64)))[0] == "pink" for s in one)


def test_extra_shape_appears_in_captions_and_pixels(tmp_path):
    out = shapes.make_dataset(tmp_path / "x", 40, 64, 4, two_object_fraction=0.25, extra_shapes=["cross"],
                              extra_shape_fraction=0.5)
    rows = [json.loads(line) for line in (out / shapes.METADATA_FILE).read_text().splitlines()]
    assert 10 <= sum(" cross " in r["text"] for r in rows) <= 35
    assert json.loads((out / shapes.MANIFEST_FILE).read_text())["arguments"]["extra_shapes"] == ["cross"]
    scenes = [shapes.sample_scene(np.random.default_rng([4, i]), 64, 0.25, extra_shapes=("cross",),
                                  extra_shape_fraction=0.5) for i in range(40)]
    assert [shapes.caption(s) for s in scenes] == [r["text"] for r in rows]
    one = [s for s in scenes if s.relation is None and s.objects[0].shape == "cross"]
    assert one
    for scene in one:
        pixels = np.asarray(shapes.render_scene(scene, 64))
        assert pixel_shape(pixels) == "cross"
        (obj,) = scene.objects  # the centre of a cross is drawn, its box's corners are not
        cx, cy = (round(c * 64) for c in obj.center)
        bg = np.array(shapes.BACKGROUNDS[scene.background])
        assert np.abs(pixels[cy, cx].astype(int) - bg).max() > 60
        corner = (round((obj.center[1] - obj.width / 2) * 64) + 1, round((obj.center[0] - obj.width / 2) * 64) + 1)
        assert np.abs(pixels[corner].astype(int) - bg).max() < 10


def test_extra_size_appears_in_captions_and_pixels(tmp_path):
    # "medium" sits in the gap between small and large, apart from both, and only in one-object scenes.
    (lo, hi), small, large = shapes.EXTRA_SIZES["medium"], shapes.SIZES["small"], shapes.SIZES["large"]
    assert small[1] < lo < hi < large[0]
    out = shapes.make_dataset(tmp_path / "m", 60, 64, 6, two_object_fraction=0.25, extra_sizes=["medium"],
                              extra_size_fraction=0.5)
    rows = [json.loads(line) for line in (out / shapes.METADATA_FILE).read_text().splitlines()]
    scenes = [shapes.sample_scene(np.random.default_rng([6, i]), 64, 0.25, extra_sizes=("medium",),
                                  extra_size_fraction=0.5) for i in range(60)]
    assert [shapes.caption(s) for s in scenes] == [r["text"] for r in rows]
    assert json.loads((out / shapes.MANIFEST_FILE).read_text())["arguments"]["extra_sizes"] == ["medium"]
    medium = [s for s in scenes if any(o.size == "medium" for o in s.objects)]
    assert 12 <= len(medium) <= 35 and all(s.relation is None for s in medium)
    assert all(r["text"].startswith("a medium ") for r, s in zip(rows, scenes) if s in medium)
    for scene in medium:
        (obj,) = scene.objects
        assert lo <= obj.width <= hi
        assert pixel_size(np.asarray(shapes.render_scene(scene, 64)), "medium")[0] == "medium"
    with pytest.raises(UserError, match="unknown size"):
        shapes.make_dataset(tmp_path / "a", 2, 64, 0, extra_sizes=["huge"])
    with pytest.raises(UserError, match="needs --extra_sizes"):
        shapes.make_dataset(tmp_path / "b", 2, 64, 0, extra_size_fraction=0.5)


def test_extra_colour_refusals(tmp_path):
    with pytest.raises(UserError, match="unknown colour"):
        shapes.make_dataset(tmp_path / "a", 2, 64, 0, extra_colours=["teal"])
    with pytest.raises(UserError, match="needs --extra_colours"):
        shapes.make_dataset(tmp_path / "b", 2, 64, 0, extra_colour_fraction=0.5)
    with pytest.raises(UserError, match="unknown shape"):
        shapes.make_dataset(tmp_path / "d", 2, 64, 0, extra_shapes=["star"])
    with pytest.raises(UserError, match="needs --extra_shapes"):
        shapes.make_dataset(tmp_path / "e", 2, 64, 0, extra_shape_fraction=0.5)
    with pytest.raises(UserError, match="a two-object scene needs two different colours"):  # was numpy's traceback
        shapes.make_dataset(tmp_path / "f", 2, 64, 0, extra_colours=["pink"], extra_colour_fraction=1.0)
    out = shapes.make_dataset(tmp_path / "g", 4, 64, 0, two_object_fraction=0, extra_colours=["pink"],
                              extra_colour_fraction=1.0)  # one-object scenes only: every one pink
    assert all(" pink " in line for line in (out / shapes.METADATA_FILE).read_text().splitlines())
    with pytest.raises(UserError, match="--labels"):
        shapes.make_dataset(tmp_path / "c", 2, 64, 0, two_object_fraction=0, labels=True, extra_colours=["pink"])


def test_pixel_measures_on_crisp_renders():
    # Fresh renders (a seed no dataset here uses) of every colour and shape incl. the new ones, sizes, positions and
    # backgrounds: the new colour and shape are named right, and an old one is never called a new one (nor
    # anything else).
    for i in range(300):
        scene = _scene(1000 + i, two_object_fraction=0.0, extra_colours=("pink", "vermilion"), extra_colour_fraction=0.4,
                       extra_shapes=("cross",), extra_shape_fraction=0.3)
        pixels = np.asarray(shapes.render_scene(scene, 64))
        seen, mean = pixel_colour(pixels)
        assert seen == scene.objects[0].colour, (scene, seen, mean)
        assert pixel_shape(pixels) == scene.objects[0].shape, scene
        # sizes: without a size concept, small / large (split at 0.375); in a run about medium, the three
        assert pixel_size(pixels)[0] == pixel_size(pixels, "medium")[0] == scene.objects[0].size, scene
    for i in range(300):
        scene = _scene(2000 + i, two_object_fraction=0.0, extra_sizes=("medium",), extra_size_fraction=0.4)
        pixels = np.asarray(shapes.render_scene(scene, 64))
        assert pixel_size(pixels, "medium")[0] == scene.objects[0].size, (scene, pixel_size(pixels, "medium"))
        assert pixel_shape(pixels) == scene.objects[0].shape, scene
    # float (3, H, W) input, as the pipeline returns, reads the same
    scene = _scene(7, two_object_fraction=0.0, extra_colours=("pink",), extra_colour_fraction=1.0)
    pixels = np.asarray(shapes.render_scene(scene, 64)).transpose(2, 0, 1) / 255.0
    assert pixel_colour(pixels)[0] == "pink"


def test_pixel_measure_empty_image_is_none():
    for bg in shapes.BACKGROUNDS.values():
        assert pixel_colour(np.full((64, 64, 3), bg, np.uint8))[0] == NONE
        assert pixel_shape(np.full((64, 64, 3), bg, np.uint8)) == NONE
        assert pixel_size(np.full((64, 64, 3), bg, np.uint8), "medium") == (NONE, None)


def test_palette_with_restores_the_judge_vocabulary():
    before = dict(judge_mod.HEADS)
    with palette_with("pink"):
        assert judge_mod.HEADS["colour"][-1] == "pink" and judge_mod.HEADS["shape"] == shapes.SHAPES
        scene = judge_mod.sample_scene(np.random.default_rng([0, 0]), 64, 0.0)
        assert scene.objects[0].colour in shapes.PALETTE
    with palette_with("cross"):
        assert judge_mod.HEADS["first_shape"][-1] == "cross" and judge_mod.HEADS["colour"] == tuple(shapes.COLOURS)
    with palette_with("medium"):  # one head: both objects of a two-object scene are small
        assert judge_mod.HEADS["size"] == (*shapes.SIZES, "medium") and "first_size" not in judge_mod.HEADS
        sizes = {judge_mod.sample_scene(np.random.default_rng([0, i]), 64, 0.0).objects[0].size for i in range(30)}
        assert "medium" in sizes
    assert judge_mod.HEADS == before and judge_mod.sample_scene is shapes.sample_scene


def test_variant_judge_trains_again_with_the_next_budget_and_keeps_the_check(tmp_path, monkeypatch):
    # Two budgets far too small to pass the 99% check: the first fails, the second is trained (and cached under its
    # own key), and its failure is the error; the standard vocabulary is restored afterwards.
    from ldm_app.evaluation import new_concept

    tiny = judge_mod.JudgeConfig(num_train=24, num_heldout=24, epochs=1, batch_size=8, width=4, feature_dim=8)
    budgets = (tiny, dataclasses.replace(tiny, num_train=32))
    monkeypatch.setattr(new_concept, "VARIANT_BUDGETS", budgets)
    lines: list[str] = []
    with pytest.raises(judge_mod.JudgeAccuracyError, match="below 99"):
        new_concept.load_or_train_variant_judge("vermilion", tmp_path, log=lines.append)
    assert any("training it again with 32 renders x 1 epochs" in line for line in lines)
    folders = sorted(p.name for p in (tmp_path / "judge-variant-vermilion").iterdir())
    assert folders == sorted(f"judge-{b.key()}" for b in budgets)
    assert "vermilion" not in judge_mod.HEADS["colour"]


def test_concept_vae_must_share_the_base_latent_space(tmp_path, capfd):
    """--vae of the evaluation: a decoder fine-tuned from the base autoencoder loads onto the base's device and
    dtype; an autoencoder with another latent scale (not fine-tuned from it) or a folder that is no autoencoder
    is refused in one line."""
    import torch
    from diffusers import AutoencoderKL

    from ldm_app.evaluation.new_concept import load_concept_vae

    def tiny(scaling_factor):
        return AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                             scaling_factor=scaling_factor)

    base = tiny(0.2).to(torch.float16)
    tiny(0.2).save_pretrained(tmp_path / "same")
    capfd.readouterr()
    vae = load_concept_vae(str(tmp_path / "same"), base)
    assert vae.dtype == torch.float16 and not vae.training
    assert "Casting directly" not in capfd.readouterr().err  # loaded in fp16, not cast after (diffusers' warning)
    tiny(0.5).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="scaling_factor is 0.5, the base model's 0.2"):
        load_concept_vae(str(tmp_path / "other"), base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a --vae autoencoder folder"):
        load_concept_vae(str(tmp_path / "empty"), base)


def test_embedding_token_reads_diffusers_format_and_refuses_others(tmp_path):
    """--embedding: the file's one key is its token; the concept's own word or a <placeholder> is accepted, a
    token naming something else (an old word: the prompts would not ask for the concept) and other files refused."""
    import torch
    from safetensors.torch import save_file

    from ldm_app.evaluation.new_concept import embedding_token

    def folder(name, tensors):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "learned_embeds.safetensors"))
        return tmp_path / name

    vec = torch.zeros(1, 8)
    path, token = embedding_token(folder("word", {"cross": vec}), "cross")
    assert token == "cross" and path.name == "learned_embeds.safetensors"
    assert embedding_token(path, "cross") == (path, "cross")  # the file itself
    assert embedding_token(folder("placeholder", {"<plus>": vec}), "cross")[1] == "<plus>"
    with pytest.raises(UserError, match="'square' is neither the concept's word 'cross'"):
        embedding_token(folder("old", {"square": vec}), "cross")
    with pytest.raises(UserError, match="found 2"):
        embedding_token(folder("two", {"<a>": vec, "<b>": vec.clone()}), "cross")
    with pytest.raises(UserError, match="no such file"):
        embedding_token(tmp_path / "missing", "cross")


def test_with_token_rewrites_only_the_concept_word():
    from ldm_app.evaluation.new_concept import new_concept_prompts, with_token

    prompts = new_concept_prompts("cross", 12, 0)
    assert all(" cross " in p.text for p in prompts)
    assert with_token(prompts, "cross", "cross") == prompts
    rewritten = with_token(prompts, "cross", "<plus>")
    for old, new in zip(prompts, rewritten):
        assert new.text == old.text.replace(" cross ", " <plus> ") and "cross" not in new.text
        assert (new.scene, new.seed) == (old.scene, old.seed)
    # a whole word only: "crosses" or "across" stay
    (p,) = with_token([prompts[0].__class__("a red cross across crosses", prompts[0].scene, 1)], "cross", "<x>")
    assert p.text == "a red <x> across crosses"


def test_cli_takes_exactly_one_adapter(tmp_path):
    from ldm_app.evaluation.new_concept import main

    with pytest.raises(UserError, match="one of the arguments --lora --embedding is required"):
        main(["--model", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="not allowed with argument"):
        main(["--model", str(tmp_path), "--lora", "a", "--embedding", "b", "--out", str(tmp_path / "o")])


def test_the_evaluation_names_no_unknown_words_per_batch(monkeypatch):
    """The base model does not know the concept's word by design: the evaluation runs with the pipeline's per-call
    "words unknown to this model" line off."""
    from ldm_app import pipeline
    from ldm_app.evaluation import new_concept

    seen = []
    monkeypatch.setattr(new_concept, "_run", lambda args: seen.append(pipeline._NOTE_UNKNOWN_WORDS.get()) or {})
    assert new_concept.run(None) == {} and seen == [False]
    assert pipeline._NOTE_UNKNOWN_WORDS.get() is True  # and back on after it
