"""The training vocabulary stored with a model (ldm_app.vocabulary) and the one "words unknown to this model" line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_app import DEFAULT_MODEL
from ldm_app.data import shapes
from ldm_app.errors import UserError
from ldm_app.vocabulary import VOCABULARY_FILE, Vocabulary, unknown_words, unknown_words_note, words

ROOT = Path(__file__).resolve().parents[1]
NOTE = "words unknown to this model"


def test_words_are_lowercase_runs_of_letters_and_digits():
    assert words("A red, RED circle!") == ["a", "red", "red", "circle"]
    assert words("(corgi:1.3) [sushi]_house\tat-the top 3d") == ["corgi", "1", "3", "sushi", "house", "at", "the",
                                                                 "top", "3d"]  # fmt: skip
    assert words("Crème brûlée") == ["crème", "brûlée"]
    assert words("  ,;!  ") == []


def test_write_then_read_round_trips(tmp_path):
    vocab = Vocabulary.from_captions(["a red circle", "A blue square on the left", ""])
    path = vocab.write(tmp_path)
    assert path == tmp_path / VOCABULARY_FILE and os.listdir(tmp_path) == [VOCABULARY_FILE]  # no temporary left
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"words": sorted(["a", "red", "circle", "blue", "square", "on", "the", "left"]), "num_captions": 3}
    assert Vocabulary.read(tmp_path) == vocab


@pytest.mark.parametrize("text", ["{", '{"words": "a b"}', '{"words": ["a", 1], "num_captions": 1}',
                                  '{"words": ["a"]}', "[]"])  # fmt: skip
def test_a_broken_file_is_a_one_line_error(tmp_path, text):
    (tmp_path / VOCABULARY_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="vocabulary.json") as err:
        Vocabulary.read(tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_words_listed_once_in_order_of_first_appearance():
    vocab = Vocabulary.from_captions(["a red circle in the center"])
    assert unknown_words("A corgi in a sushi house, a CORGI!", vocab) == ["corgi", "sushi", "house"]
    assert unknown_words(["a house", "a corgi house"], vocab) == ["house", "corgi"]
    assert unknown_words("a red circle", vocab) == []
    assert unknown_words_note(vocab, ["a corgi in a sushi house"]) == f"{NOTE}: corgi, sushi, house"
    only_negative = unknown_words_note(vocab, ["a red circle"], ["blurry corgi"])
    assert only_negative == f"{NOTE} in the negative prompt: blurry, corgi"
    # a word already named for the prompt is not named again for the negative prompt
    assert unknown_words_note(vocab, ["a corgi"], ["ugly corgi"]) == f"{NOTE}: corgi; in the negative prompt: ugly"
    assert unknown_words_note(vocab, ["a red circle"], [""]) is None
    assert unknown_words_note(None, ["a corgi"]) is None  # no vocabulary: nothing is known, nothing said


def test_the_bundled_model_knows_its_captions_and_not_corgi():
    """Its captions: the 30,000 canonical ones of its first training's data and the 29,400 training captions of each
    of its five free-form fine-tunes (recipes/shapes.sh with LONG=3); its vocabulary is exactly their words,
    synonyms included."""
    vocab = Vocabulary.read(DEFAULT_MODEL)
    assert vocab is not None and vocab.num_captions == 30000 + 5 * 29400
    known = {w for phrase in [*shapes.SHAPES, *shapes.COLOURS, *shapes.SIZES, *shapes.BACKGROUNDS,
                              *shapes.POSITIONS.values(), *shapes.RELATIONS] for w in words(phrase)}  # fmt: skip
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, 64, two_object_fraction=0.5) for _ in range(400)]
    known |= {w for s in scenes for w in words(s.caption)}
    known |= {w for s in scenes for w in words(shapes.free_caption(s, rng)[0])}
    assert known <= vocab.words, known - vocab.words
    assert vocab.words <= known  # nothing but the captions' words: the file is not a guessed list
    assert {"little", "grey", "beneath", "something"} <= vocab.words  # free-form synonyms
    assert "corgi" not in vocab and unknown_words("a corgi on a white background", vocab) == ["corgi"]


def test_a_folder_without_the_file_says_nothing(tiny_pipeline_dir, caplog):
    from ldm_app.pipeline import LatentDiffusionPipeline

    assert Vocabulary.read(tiny_pipeline_dir) is None
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vocabulary is None and pipe.unknown_words_note(["a corgi"]) is None
    with caplog.at_level(logging.WARNING):
        pipe("a corgi in a sushi house", num_inference_steps=1, output_type="np")
    assert not [r for r in caplog.records if NOTE in r.getMessage()]


def test_the_pipeline_logs_the_line_once_per_call_and_knows_embedding_tokens(tiny_pipeline_dir, tmp_path, caplog):
    from ldm_app.pipeline import LatentDiffusionPipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    Vocabulary.from_captions(["a red circle in the center"]).write(model)
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="ldm_app.pipeline"):
        pipe(["a corgi", "a sushi corgi"], negative_prompt="blurry", num_inference_steps=1, output_type="np",
             num_images_per_prompt=2)  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if NOTE in r.getMessage()]
    assert notes == [f"{NOTE}: corgi, sushi; in the negative prompt: blurry"]
    # a textual-inversion token (diffusers' load_textual_inversion adds it to the tokenizer) counts as known
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"corgi": torch.zeros(width)})
    assert pipe.unknown_words_note(["a corgi in a sushi house"]) == f"{NOTE}: sushi, house"
    # the export carries the file
    from ldm_app.export import export_model

    out = export_model(model, tmp_path / "exported", "fp16")
    assert Vocabulary.read(out) == Vocabulary.read(model)


def test_generate_py_shows_the_line_once_per_run(tmp_path):
    """Two images in two batches (two pipeline calls): still one line, on stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "a corgi in a sushi house", "--negative_prompt", "blurry",
         "--guidance_scale", "2",  # a negative prompt needs guidance; the bundled model's own is 1 (distilled in)
         "--num_images", "2", "--steps", "2", "--seed", "0", "--output", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if NOTE in line]
    assert lines == [f"WARNING: {NOTE}: corgi, sushi, house; in the negative prompt: blurry"]
    assert NOTE not in result.stdout and len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.usefixtures("fresh_accelerate")
def test_training_writes_the_vocabulary_of_its_captions(ldm_files, tmp_path):
    from ldm_helpers import run_args

    from ldm_app.training.ldm import main

    out = tmp_path / "run"
    torch.set_num_threads(1)
    main(run_args(ldm_files, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--set",
                  "ldm.use_ema=false"))  # fmt: skip
    captions = [json.loads(line)["text"] for line in (ldm_files.data / "metadata.jsonl").read_text().splitlines()]
    expected = Vocabulary.from_captions(captions)
    assert Vocabulary.read(out) == expected and Vocabulary.read(out / "checkpoint-2") == expected
    assert expected.num_captions == 8 and {"a", "background"} <= expected.words
