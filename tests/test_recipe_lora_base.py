"""recipes/lora_new_concept.sh records the base model it builds on (by the content of its files) and stops when a
later run finds another base: its finished decoder, LoRA or embedding would otherwise be skipped as done and put
together with the new model, with no word. Run as bash runs it, with a recorder as `python`."""

from __future__ import annotations

import shutil
from pathlib import Path

from recipe_helpers import run_recipe

# Each stage leaves the file the recipe waits for; the assembly's inline script reads its stdin.
DATA_AND_DECODER = r"""
  *ldm_app.data.shapes*) mkdir -p "$(arg --out "$@")" && touch "$(arg --out "$@")/metadata.jsonl" ;;
  *train_vae.py*) mkdir -p "$(arg --output_dir "$@")/vae" && touch "$(arg --output_dir "$@")/vae/config.json" ;;
  "- "*) cat > /dev/null ;;"""
# train_ldm.py stops the recipe (exit 3) so a test ends at the adapter's training.
RECORDER = r"""case "$*" in""" + DATA_AND_DECODER + r"""
  *train_ldm.py*) exit 3 ;;
  *) exit 4 ;;
esac
"""


def _base(path: Path, weights: bytes = b"unet weights") -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "vae").mkdir()
    (path / "model_index.json").write_text("{}")
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (path / "vae" / "config.json").write_text("{}")
    return path


def _run(tmp_path: Path, base: Path, out: Path, recorder: str = RECORDER, **env: str):
    return run_recipe(tmp_path, "lora_new_concept.sh", recorder, out, BASE=str(base), **env)


def _trained(calls: list[str]) -> list[str]:
    return [script for c in calls for script in ("train_vae.py", "train_ldm.py") if script in c]


def test_the_same_base_goes_on_and_a_copy_of_it_is_the_same_base(tmp_path):
    base, out = _base(tmp_path / "base"), tmp_path / "out"
    proc, calls = _run(tmp_path, base, out)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # decoder trained, then stopped at the LoRA
    assert _trained(calls) == ["train_vae.py", "train_ldm.py"]
    assert (out / "model" / "model_index.json").exists() and len((out / "base_model.sha256").read_text()) == 65
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(base, copy)
    proc, calls = _run(tmp_path, copy, out)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert _trained(calls) == ["train_ldm.py"]  # the decoder was kept


def test_another_base_stops_the_recipe_before_any_stage(tmp_path):
    out = tmp_path / "out"
    _run(tmp_path, _base(tmp_path / "old"), out)
    record = (out / "base_model.sha256").read_text()
    proc, calls = _run(tmp_path, _base(tmp_path / "new", b"other unet weights"), out)
    assert proc.returncode == 1
    assert calls == []
    assert proc.stderr.strip().splitlines() == [
        f"error: {out} was built on another base model than {tmp_path}/new (its files changed since, e.g. a new "
        f"bundled model); use another OUT, or delete {out} to start again"]
    assert (out / "base_model.sha256").read_text() == record


def test_stages_from_before_the_record_stop_the_recipe(tmp_path):
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)  # an adapter trained by the recipe before it recorded its base
    proc, calls = _run(tmp_path, _base(tmp_path / "base"), out)
    assert proc.returncode == 1 and calls == []
    assert "holds stages from before base models were recorded" in proc.stderr
    assert not (out / "base_model.sha256").exists()


def test_data_alone_does_not_tie_the_folder_to_a_base(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "metadata.jsonl").touch()
    proc, calls = _run(tmp_path, _base(tmp_path / "base"), out)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert not any("ldm_app.data.shapes" in c for c in calls)


def test_a_base_that_is_not_a_model_folder_is_refused(tmp_path):
    proc, calls = _run(tmp_path, tmp_path / "nothing", tmp_path / "out")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == f"error: BASE={tmp_path}/nothing is not a model folder (no model_index.json)"


# Every stage finishes: training leaves the adapter's file, the evaluation its report.
FINISHING = r"""case "$*" in""" + DATA_AND_DECODER + r"""
  *train_ldm.py*) d=$(arg --output_dir "$@"); mkdir -p "$d"
                  touch "$d/pytorch_lora_weights.safetensors" "$d/learned_embeds.safetensors" ;;
  *new_concept*) mkdir -p "$(arg --out "$@")" && touch "$(arg --out "$@")/new_concept.json" ;;
  *) exit 4 ;;
esac
"""


def _sampling(tmp_path: Path, **env: str) -> tuple[list[str], list[str]]:
    """The assembly's arguments (model, guidance, steps) and the evaluation's sampling flags of one full run."""
    base, out = _base(tmp_path / "base"), tmp_path / "out"
    proc, calls = _run(tmp_path, base, out, FINISHING, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (assemble,) = [c for c in calls if c.startswith("- ")]
    (evaluation,) = [c.split() for c in calls if "ldm_app.evaluation.new_concept" in c]
    flags = [f"{a} {b}" for a, b in zip(evaluation, evaluation[1:]) if a in ("--guidance_scale", "--steps")]
    return assemble.split(" ")[2:], flags


def test_a_lora_is_measured_and_assembled_at_guidance_2_and_8_steps(tmp_path):
    assert _sampling(tmp_path) == (["2", "8"], ["--guidance_scale 2", "--steps 8"])


def test_an_embedding_is_measured_and_assembled_at_the_base_models_stored_settings(tmp_path):
    # No flags: the evaluation and the assembled model keep the base's stored sampling (for the bundled model its
    # 4-step grid at guidance 1), since an embedding leaves the U-Net as it is.
    assert _sampling(tmp_path, ADAPTER="embedding") == (["", ""], [])


def test_an_embeddings_sampling_can_be_set(tmp_path):
    assert _sampling(tmp_path, ADAPTER="embedding", GUIDANCE="2", SAMPLE_STEPS="8") == (
        ["2", "8"], ["--guidance_scale 2", "--steps 8"])


def test_an_embeddings_initial_word_names_its_folders(tmp_path):
    base, out = _base(tmp_path / "base"), tmp_path / "out"
    runs = {}
    for init in ("", "red"):
        env = {"ADAPTER": "embedding", "CONCEPT": "vermilion", "DECODER_STEPS": "0"}
        env |= {"INIT_TOKEN": init} if init else {}
        proc, calls = _run(tmp_path, base, out, FINISHING, **env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (train,) = [c.split() for c in calls if "train_ldm.py" in c]
        runs[init] = train[train.index("--initializer_token") + 1], train[train.index("--output_dir") + 1]
    assert runs[""] == ("orange", f"{out}/embedding")  # vermilion starts from its nearest old word
    assert runs["red"] == ("red", f"{out}/embedding_from_red")  # another start: another folder, the first kept
    assert (out / "eval_embedding_from_red" / "new_concept.json").exists()


def test_each_concept_draws_its_own_data_and_starts_from_its_nearest_word(tmp_path):
    base = _base(tmp_path / "base")
    seen = {}
    for concept in ("cross", "pink", "vermilion", "medium"):
        out = tmp_path / concept
        env = {"ADAPTER": "embedding", "CONCEPT": concept, "DECODER_STEPS": "0"}
        proc, calls = _run(tmp_path, base, out, FINISHING, **env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (data,) = [c.split() for c in calls if "ldm_app.data.shapes" in c]
        (train,) = [c.split() for c in calls if "train_ldm.py" in c]
        (evaluation,) = [c.split() for c in calls if "ldm_app.evaluation.new_concept" in c]
        extra = [a for a in data if a.startswith("--extra_")]
        seen[concept] = (extra, data[data.index(extra[0]) + 1], train[train.index("--initializer_token") + 1],
                         train[train.index("--train_embedding") + 1], evaluation[evaluation.index("--concept") + 1])
    assert seen == {
        "cross": (["--extra_shapes", "--extra_shape_fraction"], "cross", "square", "cross", "cross"),
        "pink": (["--extra_colours", "--extra_colour_fraction"], "pink", "purple", "pink", "pink"),
        "vermilion": (["--extra_colours", "--extra_colour_fraction"], "vermilion", "orange", "vermilion", "vermilion"),
        "medium": (["--extra_sizes", "--extra_size_fraction"], "medium", "small", "medium", "medium"),
    }
    for env, message in (({"CONCEPT": "huge"}, "CONCEPT must be cross, pink, vermilion or medium, got 'huge'"),
                         ({"ADAPTER": "lora2"}, "ADAPTER must be lora, lora_te or embedding, got 'lora2'")):
        proc, calls = _run(tmp_path, base, tmp_path / "typo", FINISHING, **env)
        assert proc.returncode == 2 and calls == []
        assert proc.stderr.strip() == f"error: {message}"
        assert not (tmp_path / "typo").exists()  # refused before the run folder is made
