"""recipes/shapes.sh's LONG=N, run as bash runs it with `python` replaced by a recorder: N more free-form fine-tunes
(4,000 steps x 64 images, LR 2e-4, fresh scenes), each on the previous one, and the sweep and guidance distillation
on the last; LONG=0 (the default) is the recipe as before. A sweep or student made from another teacher by an
earlier run stops the recipe, rather than being taken as done."""

from __future__ import annotations

import json
import pytest

from recipe_helpers import run_recipe

# Every stage leaves the file the recipe waits for; the sweep names its model as evaluate sweep does; the guidance
# the recipe reads back from the teacher's ldm_app.json is 1.5.
RECORDER = r"""made() { mkdir -p "$1" && touch "$1/$2"; }
case "$*" in
  *ldm_app.data.shapes*) made "$(arg --out "$@")" metadata.jsonl ;;
  *train_vae.py*) made "$(arg --output_dir "$@")/vae" config.json ;;
  *"evaluate vae"*) touch "$(arg --json "$@")" ;;
  *"evaluate ceiling"*) exit 0 ;;
  *train_ldm.py*|*ldm_app.train_distill*) made "$(arg --output_dir "$@")" model_index.json ;;
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
    teacher = f"{out}/{names[-1]}"
    sweep = next(c for c in calls if "evaluate sweep" in c and "--write_defaults" in c and "--steps 20" in c)
    distill = next(c for c in calls if "ldm_app.train_distill" in c)
    assert _value(sweep, "--model") == teacher
    assert _value(distill, "--teacher") == teacher and _value(distill, "--train_data_dir") == f"{teacher}_data"
    assert "distill.guidance_scale=1.5" in distill


def test_a_sweep_or_student_of_another_teacher_stops_the_recipe(tmp_path):
    out = tmp_path / "out"
    proc, _ = run_recipe(tmp_path, "shapes.sh", RECORDER, out)  # LONG=0: made from free_ft2
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "sweep" / "sweep.json").read_text())["model"] == str(out / "free_ft2")
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, out, LONG="1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}/sweep was made from {out}/free_ft2, not from {out}/long1 (LONG=1)"), last
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
