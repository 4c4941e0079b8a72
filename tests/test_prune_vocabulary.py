"""`python -m ldm_app.export --prune_vocabulary`: the tokenizer and embedding table cut to the training words give
the same tokens and images for those words, load in diffusers, and refuse what they cannot do in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ldm_app.errors import UserError, run_cli
from ldm_app.export import export_model, main as export_main
from ldm_app.pipeline import LatentDiffusionPipeline
from ldm_app.prune_vocabulary import pruned_tokenizer_json
from ldm_app.vocabulary import Vocabulary

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "of", "white", "background"]


@pytest.fixture(scope="module")
def model_with_words(tiny_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune") / "model"
    shutil.copytree(tiny_pipeline_dir, folder)
    Vocabulary(frozenset(WORDS), 4).write(folder)
    return folder


@pytest.fixture(scope="module")
def pruned(model_with_words, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "out"
    export_model(model_with_words, out, "fp32", prune_vocabulary=True)
    return out


def _image(pipe, prompt):
    out = pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
               output_type="np", height=32, width=32)
    return out.images[0]


def test_pruned_folder_is_small_and_gives_the_same_image_for_its_words(model_with_words, pruned):
    full = LatentDiffusionPipeline.from_pretrained(model_with_words)
    small = LatentDiffusionPipeline.from_pretrained(pruned)
    assert full.text_encoder.config.vocab_size == 49408
    assert small.text_encoder.config.vocab_size < 1500  # base symbols + punctuation + the words' merges
    assert (pruned / "tokenizer" / "tokenizer.json").stat().st_size < 100_000
    for prompt in ("a red circle on the left of a blue square", "A RED circle, on white background... left!"):
        a, b = full.tokenizer(prompt).input_ids, small.tokenizer(prompt).input_ids
        assert len(a) == len(b) and a != b  # same tokens, renumbered
        assert np.array_equal(_image(full, prompt), _image(small, prompt))
    # the special tokens the text encoder pools at are renumbered with it
    tok = small.tokenizer
    assert small.text_encoder.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert small.text_encoder.config.bos_token_id == tok.bos_token_id


def test_a_word_the_model_never_saw_still_tokenizes(pruned):
    small = LatentDiffusionPipeline.from_pretrained(pruned)
    ids = small.tokenizer("a corgi").input_ids
    assert len(ids) > 4 and max(ids) < small.text_encoder.config.vocab_size  # pieces of it, all in the table
    assert _image(small, "a corgi").shape == (32, 32, 3)


def test_pruned_folder_loads_in_plain_diffusers(pruned, model_with_words):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(pruned, safety_checker=None, requires_safety_checker=False)
    ours = LatentDiffusionPipeline.from_pretrained(model_with_words)
    prompt = "a blue square on the left"
    emb_theirs = theirs.encode_prompt(prompt, "cpu", 1, False)[0]
    emb_ours = ours.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(emb_theirs, emb_ours)


def test_textual_inversion_adds_a_token_to_a_pruned_model(pruned, tmp_path):
    from safetensors.torch import save_file

    from ldm_app.adapters import load_embeddings

    small = LatentDiffusionPipeline.from_pretrained(pruned)
    size = small.text_encoder.config.vocab_size
    dim = small.text_encoder.config.hidden_size
    path = tmp_path / "shiny.safetensors"
    save_file({"<shiny>": torch.randn(1, dim)}, str(path))
    assert load_embeddings(small, [path], ["<shiny>"]) == ["<shiny>"]
    assert small.tokenizer.convert_tokens_to_ids("<shiny>") == size
    assert _image(small, "a <shiny> circle").shape == (32, 32, 3)


def test_prune_refusals_are_one_line(tiny_pipeline_dir, model_with_words, tmp_path, capsys):
    with pytest.raises(UserError, match="needs the model's training words"):
        export_model(tiny_pipeline_dir, tmp_path / "a", prune_vocabulary=True)  # no vocabulary.json
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="cannot go with --single_file"):
        export_model(model_with_words, tmp_path / "b.safetensors", single_file=True, prune_vocabulary=True)
    assert run_cli(export_main, ["--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "c"),
                                 "--prune_vocabulary"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prune_vocabulary needs")


def test_a_tokenizer_that_is_not_clip_bpe_is_refused(model_with_words):
    data = json.loads((model_with_words / "tokenizer" / "tokenizer.json").read_text())
    data["model"]["type"] = "WordPiece"
    with pytest.raises(UserError, match="not CLIP's byte-level BPE"):
        pruned_tokenizer_json(data, Vocabulary(frozenset(WORDS)))


def test_pruning_keeps_every_merge_a_word_needs(model_with_words):
    data = json.loads((model_with_words / "tokenizer" / "tokenizer.json").read_text())
    out, old_ids = pruned_tokenizer_json(data, Vocabulary(frozenset(["triangle", "orange"])))
    vocab = out["model"]["vocab"]
    assert "triangle</w>" in vocab and "orange</w>" in vocab and "circle</w>" not in vocab
    assert sorted(vocab.values()) == list(range(len(old_ids)))  # dense new ids
    assert [old_ids[vocab[t]] for t in ("triangle</w>", "orange</w>")] == \
        [data["model"]["vocab"][t] for t in ("triangle</w>", "orange</w>")]  # fmt: skip
