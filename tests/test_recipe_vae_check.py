"""recipes/shapes.sh's autoencoder check, run as bash runs it, with `python` on PATH replaced by a recorder (the
stages themselves take hours): an autoencoder below the ceiling gate is trained again with the next seed, the
stages after it are built on the one that passed, three failures stop the recipe before the LDM, and stages that
an earlier run trained on another autoencoder stop it too (they would be mixed with the new one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recipe_helpers import ROOT, run_recipe

# Makes the file a stage waits for; `evaluate ceiling` fails for the autoencoders listed in $FAIL_VAES;
# train_ldm.py stops the recipe (exit 3) so the test ends there.
RECORDER = r"""case "$*" in
  *ldm_app.data.shapes*) mkdir -p "$(arg --out "$@")" && touch "$(arg --out "$@")/metadata.jsonl" ;;
  *train_vae.py*) mkdir -p "$(arg --output_dir "$@")/vae" && touch "$(arg --output_dir "$@")/vae/config.json" ;;
  *"evaluate vae"*) touch "$(arg --json "$@")" ;;
  *"evaluate ceiling"*) for v in $FAIL_VAES; do [ "$(arg --model "$@")" = "$v" ] && exit 2; done; exit 0 ;;
  *train_ldm.py*) exit 3 ;;
  *) exit 4 ;;
esac
"""


def _run(tmp_path: Path, fail: list[str]):
    out = tmp_path / "out"
    proc, calls = run_recipe(tmp_path, "shapes.sh", RECORDER, out,
                             FAIL_VAES=" ".join(str(out / name) for name in fail))
    return proc, calls, out


def _seeds_trained(calls: list[str]) -> list[str]:
    return [c.split("--seed ")[1].split()[0] for c in calls if "train_vae.py" in c]


def test_a_failing_autoencoder_is_trained_again_and_the_ldm_uses_the_one_that_passed(tmp_path):
    proc, calls, out = _run(tmp_path, ["vae"])
    assert proc.returncode == 3, proc.stdout + proc.stderr  # stopped by the recorder at train_ldm.py
    assert _seeds_trained(calls) == ["0", "1"]
    ldm = [c for c in calls if "train_ldm.py" in c]
    assert len(ldm) == 1 and f"--pretrained_vae {out}/vae_seed1/vae " in ldm[0]
    assert "the autoencoder of seed 0 loses colours or shapes" in proc.stdout


def test_a_passing_autoencoder_is_used_at_once(tmp_path):
    proc, calls, out = _run(tmp_path, [])
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert _seeds_trained(calls) == ["0"]
    assert f"--pretrained_vae {out}/vae/vae " in [c for c in calls if "train_ldm.py" in c][0]


@pytest.mark.parametrize("rerun", [False, True])
def test_three_failures_stop_before_the_ldm(tmp_path, rerun):
    fail = ["vae", "vae_seed1", "vae_seed2"]
    proc, calls, _ = _run(tmp_path, fail)
    if rerun:  # a second run trains nothing again: each autoencoder is kept, only the checks run again
        proc, calls, _ = _run(tmp_path, fail)
        assert _seeds_trained(calls) == []
    else:
        assert _seeds_trained(calls) == ["0", "1", "2"]
    assert proc.returncode == 1
    assert not any("train_ldm.py" in c for c in calls)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: three autoencoders (seeds 0-2)")


def _trained_on(folder: Path, key: str, vae: str) -> None:
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(f'{{\n  "seed": 0,\n  "{key}": "{vae}",\n  "other": 1\n}}\n')


@pytest.mark.parametrize("stage, key", [("ldm", "pretrained_vae"), ("decoder", "init_from")])
def test_a_stage_trained_on_another_autoencoder_stops_the_recipe(tmp_path, stage, key):
    # a folder from before the check: its LDM (or decoder) was trained on the seed-0 autoencoder, which now fails
    out = tmp_path / "out"
    _trained_on(out / stage, key, f"{out}/vae/vae")
    proc, calls, _ = _run(tmp_path, ["vae"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not any("train_ldm.py" in c for c in calls)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}/{stage} was trained on another autoencoder ({out}/vae/vae) than "
                           f"{out}/vae_seed1/vae"), last


def test_a_stage_trained_on_the_chosen_autoencoder_goes_on_however_its_path_was_written(tmp_path):
    out = tmp_path / "out"
    # the same folder written another way (as a relative path from elsewhere, with a ./ in it)
    _trained_on(out / "ldm", "pretrained_vae", os.path.relpath(out / "vae_seed1" / "./vae", ROOT))
    proc, calls, _ = _run(tmp_path, ["vae"])
    assert proc.returncode == 3, proc.stdout + proc.stderr  # on to train_ldm.py (the recorder stops there)
    assert any("train_ldm.py" in c for c in calls)
