"""recipes/shapes.sh's LONG=N, run as bash runs it with `python` replaced by a recorder: N more free-form fine-tunes
(4,000 steps x 64 images, LR 2e-4, fresh scenes), each on the previous one, two more decoder fine-tunes on the last
scenes, and the sweep and guidance distillation on the last fine-tune with that decoder; LONG=0 (the default) is the
recipe as before. A sweep or student made from another teacher by an earlier run stops the recipe, rather than being
taken as done."""

from __future__ import annotations

import json
import pytest

from recipe_helpers import run_recipe

# Every stage leaves the file the recipe waits for (a fine-tune also a latent cache and its autoencoder); the sweep
# names its model as evaluate sweep does; the guidance the recipe reads back from the teacher's ldm_app.json is 1.5.
RECORDER = r"""made() { mkdir -p "$1" && touch "$1/$2"; }
case "$*" in
  *ldm_app.data.shapes*) made "$(arg --out "$@")" metadata.jsonl ;;
  *train_vae.py*) made "$(arg --output_dir "$@")/vae" config.json ;;
  *"evaluate vae"*) touch "$(arg --json "$@")" ;;
  *"evaluate ceiling"*) exit 0 ;;
  *train_ldm.py*) made "$(arg --output_dir "$@")" model_index.json
                 made "$(arg --output_dir "$@")/latent_cache" x; made "$(arg --output_dir "$@")/vae" from_ldm ;;
  *ldm_app.train_distill*) made "$(arg --output_dir "$@")" model_index.json ;;
  *"evaluate sweep"*) mkdir -p "$(arg --out "$@")"
                      echo "{\"model\": \"$(realpath -m "$(arg --model "$@")")\"}" > "$(arg --out "$@")/sweep.json" ;;
  *"-c import json"*) echo 1.5 ;;
  *ldm_app.export*) made "$(arg --out "$@")" model_index.json ;;
  *"evaluate ldm"*) made "$(arg --out "$@")" adherence.json ;;
  *) exit 4 ;;
esac
"""


def _fine_tunes(calls: list[str]) -> list[str]:
    return [c for c in calls if "train_ldm.py" in c and "--pretrained_model" in c]


def _value(call: str, flag: str) -> str:
    return call.split(f"{flag} ")[1].split()[0]


@pytest.mark.parametrize("long", [0, 2])
def test_long_adds_fine_tunes_and_the_rest_builds_on_the_last(tmp_path, long):
    out = tmp_path / "out"
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, out, LONG=str(long))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tunes = _fine_tunes(calls)
    names = ["free_ft", "free_ft2"] + [f"long{i}" for i in range(1, long + 1)]
    assert [_value(c, "--output_dir") for c in tunes] == [f"{out}/{n}" for n in names]
    assert [_value(c, "--pretrained_model") for c in tunes] == [f"{out}/{n}" for n in ["model", *names[:-1]]]
    for call in tunes[2:]:  # the long ones: 4,000 steps x 64 images (one process here), LR 2e-4, their own scenes
        assert "train.max_train_steps=4000" in call and "train.train_batch_size=64" in call
        assert "train.learning_rate=2e-4" in call
    for call in tunes[:2]:
        assert "train.max_train_steps=2500" in call and "train.train_batch_size=32" in call
    renders = [_value(c, "--seed") for c in calls if "ldm_app.data.shapes" in c]
    assert renders == [str(s) for s in range(long + 3)]  # the base data, then one seed per fine-tune
    decoders = [c for c in calls if "train_vae.py" in c and "train_decoder_only=true" in c]
    last, data = names[-1], f"{out}/{names[-1]}_data"
    if long:  # the decoder fine-tuned twice more on the last scenes, each round from the one before
        assert [_value(c, "--pretrained_vae") for c in decoders[1:]] == [
            f"{out}/decoder/vae", f"{out}/{last}_decoder/vae"]
        assert all(_value(c, "--train_data_dir") == data for c in decoders[1:])
        assert ["train.max_train_steps=3000" in decoders[1], "train.max_train_steps=4000" in decoders[2]] == [True] * 2
        teacher = out / f"{last}_teacher"  # the last fine-tune with the last decoder, checkpoints left behind
        assert (teacher / "model_index.json").exists() and (teacher / "vae" / "config.json").exists()
        assert not (teacher / "vae" / "from_ldm").exists() and not (teacher / "latent_cache").exists()
        assert (out / last / "latent_cache").exists()  # left where it was
    else:
        teacher = out / last
    assert len(decoders) == (3 if long else 1)
    sweep = next(c for c in calls if "evaluate sweep" in c and "--write_defaults" in c and "--steps 20" in c)
    distill = next(c for c in calls if "ldm_app.train_distill" in c)
    assert _value(sweep, "--model") == str(teacher)
    assert _value(distill, "--teacher") == str(teacher) and _value(distill, "--train_data_dir") == data
    assert "distill.guidance_scale=1.5" in distill


def test_a_decoder_round_from_another_decoder_stops_the_recipe(tmp_path):
    """A second-round decoder folder whose run_config.json names another starting decoder is not taken as done."""
    out = tmp_path / "out"
    (out / "long1_decoder2").mkdir(parents=True)
    (out / "long1_decoder2" / "run_config.json").write_text(json.dumps({"init_from": str(out / "decoder" / "vae")}))
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, out, LONG="1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out}/long1_decoder2 was fine-tuned from {out}/decoder/vae, not from {out}/long1_decoder/vae; "
        f"delete {out}/long1_decoder2 and the stages after it")
    assert not any("ldm_app.train_distill" in c for c in calls)


def test_a_sweep_or_student_of_another_teacher_stops_the_recipe(tmp_path):
    out = tmp_path / "out"
    proc, _ = run_recipe(tmp_path, "shapes.sh", RECORDER, out)  # LONG=0: made from free_ft2
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "sweep" / "sweep.json").read_text())["model"] == str(out / "free_ft2")
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, out, LONG="1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {out}/sweep was made from {out}/free_ft2, not from {out}/long1_teacher (LONG=1)"), last
    assert not any("train_ldm.py" in c or "ldm_app.train_distill" in c for c in calls)  # before any training
    # the student alone, of another teacher (its run_config.json names it), stops it too
    (out / "sweep").rename(tmp_path / "old_sweep")
    (out / "student" / "run_config.json").write_text(json.dumps({"ldm": {"pretrained_model": str(out / "free_ft2")}}))
    proc, _ = run_recipe(tmp_path, "shapes.sh", RECORDER, out, LONG="1")
    assert proc.returncode == 1 and f"error: {out}/student was made from {out}/free_ft2" in proc.stderr


@pytest.mark.parametrize("long", ["two", "-1", "1.5"])
def test_a_long_that_is_not_a_count_is_one_line(tmp_path, long):
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, tmp_path / "out", LONG=long)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: LONG must be a whole number of extra fine-tunes (0, 1, 2...), got '{long}'"]
    assert calls == []  # before the first stage
