"""Checkpoint folders: atomic, pruned, corrupt-latest fallback, run-folder identity."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator

from ldm_app.checkpointing import (
    check_run_folder,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    write_run_config,
)
from ldm_app.errors import UserError


@pytest.fixture
def acc_and_model():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def test_save_prune_and_restore(tmp_path, acc_and_model):
    acc, model, opt = acc_and_model
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(acc, tmp_path, step, {"step": step}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temp folder left behind
    state = load_checkpoint(acc, resolve_resume(tmp_path, "latest"))
    assert state == {"step": 3}
    assert torch.all(model.weight == 3)


def test_corrupt_latest_falls_back_with_warning(tmp_path, acc_and_model, caplog):
    acc, _, _ = acc_and_model
    for step in (1, 2):
        save_checkpoint(acc, tmp_path, step, {"step": step})
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated by a crash or a full disk
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path, "latest").name == "checkpoint-1"
    assert "checkpoint-2 is corrupt" in caplog.text
    with pytest.raises(UserError, match="cannot be resumed"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-2"))


def test_latest_without_checkpoints_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path, "latest") is None
    assert "starting a fresh run" in caplog.text
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))


def test_run_folder_identity(tmp_path, acc_and_model):
    acc, _, _ = acc_and_model
    run = {"train": {"seed": 0, "max_train_steps": 10}}
    check_run_folder(tmp_path, run, resuming=False)  # empty folder: fine
    write_run_config(tmp_path, run)
    save_checkpoint(acc, tmp_path, 1, {"step": 1})
    with pytest.raises(UserError, match="already holds checkpoints"):
        check_run_folder(tmp_path, run, resuming=False)
    other = {"train": {"seed": 1, "max_train_steps": 10}}
    with pytest.raises(UserError, match="different run.*train.seed"):
        check_run_folder(tmp_path, other, resuming=True)
    longer = {"train": {"seed": 0, "max_train_steps": 20}}
    check_run_folder(tmp_path, longer, resuming=True, may_differ=("train.max_train_steps",))


def test_run_saved_before_a_new_field_resumes_with_its_legacy_value(tmp_path, acc_and_model):
    """A run config written before `train.fused_adam` existed ran the loop AdamW: it resumes with
    fused_adam=False (what it used) and is refused with today's default True (another optimiser kernel)."""
    acc, _, _ = acc_and_model
    old = {"train": {"seed": 0, "max_train_steps": 10}}  # no fused_adam key: saved before the field existed
    write_run_config(tmp_path, old)
    save_checkpoint(acc, tmp_path, 1, {"step": 1})
    check_run_folder(tmp_path, {"train": {"seed": 0, "max_train_steps": 10, "fused_adam": False}}, resuming=True)
    with pytest.raises(UserError, match="train.fused_adam"):
        check_run_folder(tmp_path, {"train": {"seed": 0, "max_train_steps": 10, "fused_adam": True}}, resuming=True)


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path, acc_and_model):
    """The LR scheduler's count and the data position are per process: resumed with another number of processes,
    the run would go on on another schedule and other data, with no word."""
    from ldm_app.checkpointing import load_checkpoint

    acc, _, _ = acc_and_model
    path = save_checkpoint(acc, tmp_path, 4, {"step": 4})
    state_file = path / "training_state.json"
    assert json.loads(state_file.read_text()) == {"step": 4, "num_processes": 1}
    assert load_checkpoint(acc, path) == {"step": 4}
    state_file.write_text(json.dumps({"step": 4, "num_processes": 2}))  # as a 2-process run saves it
    with pytest.raises(UserError, match=r"saved by a run of 2 process\(es\), this one has 1: resume it with 2"):
        load_checkpoint(acc, path)
    state_file.write_text(json.dumps({"step": 4}))  # saved before the count was recorded: resumed as before
    assert load_checkpoint(acc, path) == {"step": 4}
