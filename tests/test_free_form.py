"""Free-form captions (issue #19): the generator's opt-in free captions, their parser, and the evaluation that
scores a free-form prompt only on what it states."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app.data import shapes
from ldm_app.data.shapes import (
    RELATION_POSITIONS,
    SYNONYMS,
    Scene,
    caption,
    free_caption,
    make_dataset,
    parse_caption,
    render_scene,
    sample_scene,
)
from ldm_app.errors import UserError, run_cli
from ldm_app.evaluate import main as evaluate_main
from ldm_app.evaluation.adherence import Prompt, prompt_labels, render, sample_prompts, score
from ldm_app.evaluation.geometry import GeometryJudge
from ldm_app.evaluation.judge import HEADS, scene_labels

# shapes_manifest.json of make_dataset(out, 40, 32, seed=3, two_object_fraction=0.5) written by the generator
# before free captions existed (commit 453cadd): it holds the SHA-256 of every image and of metadata.jsonl.
CANONICAL_MANIFEST_SHA256 = "7033e783b2602493ffd41e4d36dfb0073ff6152ac7ee389406bd792d009c9203"
N, RES, SEED, TWO = 40, 32, 3, 0.5


def _scenes(n: int, seed: int = 0, two: float = 0.4) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), 64, two) for i in range(n)]


def _free(n: int, seed: int = 0, two: float = 0.4) -> list[tuple[Scene, str, dict]]:
    out = []
    for i, scene in enumerate(_scenes(n, seed, two)):
        text, stated = free_caption(scene, np.random.default_rng([seed, shapes.FREE_CAPTION_STREAM, i]))
        out.append((scene, text, stated))
    return out


def _read(folder) -> tuple[bytes, list[dict], dict]:
    manifest = (folder / shapes.MANIFEST_FILE).read_bytes()
    rows = [json.loads(line) for line in (folder / shapes.METADATA_FILE).read_text().splitlines()]
    return manifest, rows, json.loads(manifest)


# ---- the generator -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets_by_style(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles")
    out = {}
    for name, fraction in (("default", None), ("zero", 0.0), ("half", 0.5), ("half_again", 0.5), ("all", 1.0)):
        kwargs = {} if fraction is None else {"free_caption_fraction": fraction}
        out[name] = _read(make_dataset(root / name, N, RES, SEED, TWO, **kwargs))
    return out


def test_canonical_output_is_byte_identical_to_before(datasets_by_style):
    for name in ("default", "zero"):
        manifest, rows, _ = datasets_by_style[name]
        assert hashlib.sha256(manifest).hexdigest() == CANONICAL_MANIFEST_SHA256, name
        # and the captions are the canonical generator's, scene by scene
        scenes = [sample_scene(np.random.default_rng([SEED, i]), RES, TWO) for i in range(N)]
        assert [r["text"] for r in rows] == [caption(s) for s in scenes]


def test_free_style_same_images_deterministic_and_recorded(datasets_by_style):
    _, canonical_rows, canonical = datasets_by_style["default"]
    manifest, rows, record = datasets_by_style["half"]
    assert manifest == datasets_by_style["half_again"][0]  # deterministic for its seed
    images = {k: v for k, v in record["files"].items() if k.endswith(".png")}
    assert images == {k: v for k, v in canonical["files"].items() if k.endswith(".png")}  # same image bytes
    assert record["arguments"]["free_caption_fraction"] == 0.5
    assert "free_caption_fraction" not in canonical["arguments"]
    changed = sum(a["text"] != b["text"] for a, b in zip(rows, canonical_rows))
    assert 0 < changed < N  # about half the captions are free-form, the rest canonical
    _, all_rows, _ = datasets_by_style["all"]
    scenes = [sample_scene(np.random.default_rng([SEED, i]), RES, TWO) for i in range(N)]
    for row, scene in zip(all_rows, scenes):  # every one of them says only true things about its image
        stated = parse_caption(row["text"])
        _check_matches_scene(stated, scene)


def _check_matches_scene(stated: dict, scene: Scene) -> None:
    if "background" in stated:
        assert stated["background"] == scene.background
    if scene.relation is None:
        assert "relation" not in stated and "objects" not in stated
        (obj,) = scene.objects
        for attribute in ("colour", "shape", "size", "position"):
            if attribute in stated:
                assert stated[attribute] == getattr(obj, attribute), (attribute, stated)
        assert "colour" in stated or "shape" in stated
        return
    written_positions = RELATION_POSITIONS[stated["relation"]]
    by_position = {o.position: o for o in scene.objects}
    for described, position in zip(stated["objects"], written_positions):
        obj = by_position[position]  # the object the text puts there
        for attribute, value in described.items():
            assert value == getattr(obj, attribute), (attribute, stated, scene)


def test_free_captions_parse_back_to_exactly_what_they_state():
    samples = _free(600)
    for scene, text, stated in samples:
        assert parse_caption(text) == stated, text
        _check_matches_scene(stated, scene)
        if scene.relation is not None:  # both objects named by colour and shape
            assert all({"colour", "shape"} <= set(o) for o in stated["objects"])
    one = [stated for scene, _, stated in samples if scene.relation is None]
    for attribute in ("colour", "shape", "size", "position", "background"):  # each attribute both said and left out
        said = sum(attribute in s for s in one)
        assert 0 < said < len(one), attribute
    # an omitted attribute leaves no word of it behind: "a red circle" says nothing of size, place or background
    shortest = [text for _, text, stated in samples if set(stated) == {"colour", "shape"}]
    assert shortest
    for text in shortest:
        assert not any(w in text for words in SYNONYMS["size"].values() for w in words)
        assert "background" not in text
        assert not any(p in text for p in ("left", "right", "top", "bottom", "cent", "mid"))


def test_free_captions_vary_wording_and_order():
    texts = [text for _, text, _ in _free(600)]
    joined = "\n".join(texts)
    for word in ("little", "big", "grey", "in the middle", "in the centre", "near the top", "against a", "beneath",
                 "left of", "something ", " shape", " object", "an orange"):
        assert word in joined, word
    assert any(t.startswith(("on a", "against a")) for t in texts)  # background first
    assert any(t.startswith(("at the", "on the", "near the", "in the")) for t in texts)  # position first
    assert any(", a " in t for t in texts)
    # two-object scenes are also said the other way round: "B below A" for a scene drawn as "A above B"
    flipped = [(s, st) for s, _, st in _free(300, two=1.0) if st["relation"] != s.relation]
    assert flipped and all(st["relation"] == shapes.INVERSE_RELATIONS[s.relation] for s, st in flipped)


@pytest.mark.parametrize("text, expected", [
    ("a big red circle in the middle on a grey background",
     {"size": "large", "colour": "red", "shape": "circle", "position": "center", "background": "gray"}),
    ("against a black background, a little orange object at the left",
     {"size": "small", "colour": "orange", "background": "black", "position": "left"}),
    ("something blue on the left side", {"colour": "blue", "position": "left"}),
    ("a circle", {"shape": "circle"}),
    ("A Red  Circle", {"colour": "red", "shape": "circle"}),  # case and spacing
    ("a green square beneath an orange circle",
     {"relation": "below",
      "objects": ({"colour": "green", "shape": "square"}, {"colour": "orange", "shape": "circle"})}),
    ("on a gray background, a small red circle right of a small blue square",
     {"background": "gray", "relation": "to the right of",
      "objects": ({"size": "small", "colour": "red", "shape": "circle"},
                  {"size": "small", "colour": "blue", "shape": "square"})}),
])
def test_synonyms_resolve(text, expected):
    assert parse_caption(text) == expected


@pytest.mark.parametrize("text", [
    "a corgi in a sushi house", "a small object", "something on the left", "a red circle on the left at the top",
    "a red circle above a blue square below a green triangle",
    "a red circle on a white background on a black background",
    "a red, circle", "a red circle above", "a red box",
])
def test_parser_refuses_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_canonical_captions_parse_to_every_attribute():
    for scene in _scenes(300):
        assert prompt_labels(caption(scene)) == scene_labels(scene)


# ---- the evaluation ------------------------------------------------------------------------------------------------


def test_free_prompt_set_is_deterministic_and_shares_scenes_and_seeds():
    free, again, canonical = (sample_prompts(30, 20, 4, style=s) for s in ("free", "free", "canonical"))
    assert [p.text for p in free] == [p.text for p in again]
    assert [(p.scene, p.seed) for p in free] == [(p.scene, p.seed) for p in canonical]
    assert sum(a.text != b.text for a, b in zip(free, canonical)) >= 45
    assert [p.text for p in sample_prompts(30, 20, 4)] == [caption(p.scene) for p in canonical]
    for p in free:  # each free prompt's labels: its scene's, where stated, and nothing else
        stated, truth = prompt_labels(p.text), scene_labels(p.scene)
        assert all(v == truth[h] for h, v in stated.items() if v >= 0) and stated["count"] == truth["count"]
    with pytest.raises(UserError, match="--prompt_style must be one of canonical, free"):
        sample_prompts(2, 2, 0, style="fancy")


def _one_object(colour="red", shape="circle", size="small", position="left", background="white") -> Scene:
    rng = np.random.default_rng(0)
    obj = shapes._sample_object(rng, size, position, colour, 1 / 64)
    return Scene(background=background, objects=(dataclasses.replace(obj, shape=shape),))


class _FixedJudge:
    """Predicts the given labels per image (a stand-in for the CNN judge: the scoring is shared by both)."""

    def __init__(self, labels: list[dict[str, int]]):
        self.labels = labels

    def predict(self, images):
        return {h: torch.tensor([max(lab[h], 0) for lab in self.labels]) for h in HEADS}


def test_only_stated_attributes_are_scored_by_both_judges():
    asked = _one_object("red", "circle", "small", "left", "white")
    # drawn: right colour and shape, but large, in the center, on black: all three left out of the first prompt
    drawn_same_object = _one_object("red", "circle", "large", "center", "black")
    drawn_wrong_colour = _one_object("blue", "circle", "large", "center", "black")
    prompts = [
        Prompt("a red circle", asked, 1),  # nothing wrong is stated: right
        Prompt("a small red circle", asked, 2),  # the size is stated and wrong: counted
        Prompt("a red circle", asked, 3),  # the colour is stated and wrong: counted
        Prompt("a small red circle on the left on a white background", asked, 4),  # canonical: all counted
    ]
    images = render([drawn_same_object, drawn_same_object, drawn_wrong_colour, drawn_same_object], 64)
    truth = [scene_labels(s) for s in (drawn_same_object, drawn_same_object, drawn_wrong_colour, drawn_same_object)]
    for judge in (GeometryJudge(), _FixedJudge(truth)):
        summary, records = score(judge, prompts, images)
        one = summary["one_object"]
        assert [r["correct"] for r in records] == [True, False, False, False], type(judge).__name__
        assert one["num_stated"] == {"count": 4, "colour": 4, "shape": 4, "size": 2, "position": 1, "background": 1,
                                     "all_attributes": 4}
        assert one["accuracy"]["size"] == 0.0 and one["accuracy"]["position"] == 0.0
        assert one["accuracy"]["colour"] == 0.75 and one["accuracy"]["shape"] == 1.0
        assert one["accuracy"]["all_attributes"] == 0.25


def test_two_object_prompts_score_the_stated_relation_in_either_order():
    scene = sample_scene(np.random.default_rng([0, 1]), 64, 1.0)
    first, second = scene.objects
    say = lambda o: f"a {o.colour} {o.shape}"  # noqa: E731
    inverse = shapes.INVERSE_RELATIONS[scene.relation]
    prompts = [Prompt(f"{say(first)} {scene.relation} {say(second)}", scene, 1),
               Prompt(f"{say(second)} {inverse} {say(first)}", scene, 2)]
    wrong_background = dataclasses.replace(scene, background={"white": "black"}.get(scene.background, "white"))
    images = render([wrong_background, wrong_background], 64)  # background left out of both prompts
    summary, records = score(GeometryJudge(), prompts, images)
    assert [r["correct"] for r in records] == [True, True]
    assert "background" not in summary["two_object"]["num_stated"]
    swapped = Scene(scene.background, scene.objects, inverse)  # the objects drawn on the other sides
    flipped = dataclasses.replace(swapped, objects=tuple(
        dataclasses.replace(o, center=(1 - o.center[0], 1 - o.center[1]),
                            position=RELATION_POSITIONS[inverse][k]) for k, o in enumerate(scene.objects)))
    summary, records = score(GeometryJudge(), prompts, render([flipped, flipped], 64))
    assert [r["correct"] for r in records] == [False, False]


def test_a_prompt_that_misdescribes_its_scene_is_refused():
    scene = _one_object("red", "circle")
    with pytest.raises(ValueError, match="contradicts its scene on colour"):
        score(GeometryJudge(), [Prompt("a blue circle", scene, 0)], render([scene], 64))


# ---- command lines -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["ldm", "--model", "M", "--prompt_style", "fancy"], "argument --prompt_style: invalid choice: 'fancy'"),
    (["sweep", "--model", "M", "--prompt_style", "fancy"], "argument --prompt_style: invalid choice: 'fancy'"),
])
def test_bad_prompt_style_is_one_line(argv, message, capsys):
    assert run_cli(evaluate_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_bad_free_caption_fraction_is_one_line(value, tmp_path, capsys):
    argv = ["--out", str(tmp_path / "d"), "--num_images", "2", "--free_caption_fraction", value]
    assert run_cli(shapes.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--free_caption_fraction must be between 0 and 1" in err
    assert not (tmp_path / "d").exists()


def test_cli_writes_free_captions(tmp_path):
    assert run_cli(shapes.main, ["--out", str(tmp_path / "d"), "--num_images", "6", "--resolution", "32",
                                 "--free_caption_fraction", "1"]) == 0
    _, rows, record = _read(tmp_path / "d")
    assert record["arguments"]["free_caption_fraction"] == 1.0
    scenes = [sample_scene(np.random.default_rng([0, i]), 32, 0.25) for i in range(6)]
    for row, scene in zip(rows, scenes):
        _check_matches_scene(parse_caption(row["text"]), scene)
    with Image.open(tmp_path / "d" / "000000.png") as image:  # the images are the scenes' renders
        assert np.array_equal(np.asarray(render_scene(scenes[0], 32)), np.asarray(image))


def test_ldm_and_sweep_commands_take_free_prompts(tiny_pipeline_dir, tiny_judge_cache, tmp_path, capsys):
    common = ["--model", str(tiny_pipeline_dir), "--num_prompts", "6", "--two_object_prompts", "2", "--steps", "2",
              "--batch_size", "8", "--judge_cache", str(tiny_judge_cache), "--judge_threshold", "0", "--device", "cpu",
              "--prompt_style", "free"]
    evaluate_main(["ldm", *common, "--kid_subsets", "3", "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "adherence.json").read_text())
    expected = sample_prompts(6, 2, 0, style="free")
    assert report["settings"]["prompt_style"] == "free"
    assert [r["prompt"] for r in report["per_prompt"]] == [p.text for p in expected]
    stated = [prompt_labels(p.text) for p in expected[:6]]
    for attribute in ("size", "position", "background"):  # the report counts the prompts that state each one
        assert report["one_object"]["num_stated"].get(attribute, 0) == sum(s[attribute] >= 0 for s in stated)
    assert "stated in" in capsys.readouterr().out  # some attribute is left out of some of these 6 prompts
    evaluate_main(["sweep", *common, "--guidance_scales", "3", "--out", str(tmp_path / "sweep")])
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["prompts"]["prompt_style"] == "free" and len(sweep["rows"]) == 1
    per_setting = json.loads((tmp_path / "sweep" / sweep["rows"][0]["setting"] / "adherence.json").read_text())
    assert [r["prompt"] for r in per_setting["per_prompt"]] == [p.text for p in expected]
