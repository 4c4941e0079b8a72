"""Typed configs: YAML + overrides, strict validation with errors that name the key, save/load round trip."""

from dataclasses import dataclass, field

import pytest

from ldm_app.config import (
    AutoencoderConfig,
    NoiseScheduleConfig,
    TrainConfig,
    UNetConfig,
    diff_configs,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from ldm_app.errors import UserError


@dataclass
class Run:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  kind: vq\n  latent_channels: 3\ntrain:\n  learning_rate: 1e-4\n")
    cfg = load_config(Run, path, ["train.learning_rate=0.002", "unet.attention=[false, true, false]"])
    assert cfg.model.kind == "vq" and cfg.model.latent_channels == 3
    assert cfg.train.learning_rate == pytest.approx(0.002)
    assert cfg.unet.attention == (False, True, False)
    assert cfg.model.block_out_channels == AutoencoderConfig().block_out_channels  # default kept


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(Run, path).train.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=1", ["train.lr", "learning_rate"]),  # unknown key, valid keys listed
        ("nope.x=1", ["nope"]),
        ("model.kind=gan", ["model.kind", "'kl'", "'vq'"]),
        ("train.max_train_steps=1.5", ["train.max_train_steps", "int"]),
        ("train.mixed_precision=fp8", ["mixed_precision"]),
        ("model.latent_channels=0", ["model", "latent_channels", "> 0"]),
        ("model.block_out_channels=[30,64,64,64]", ["norm_num_groups"]),
        ("unet.attention=[true]", ["attention", "one entry per level"]),
        ("noise.beta_start=0.5", ["beta_start", "beta_end"]),
        ("train.learning_rate=fast", ["train.learning_rate", "number"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config(Run, None, [override])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        parse_overrides(["learning_rate"])
    with pytest.raises(UserError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(Run, bad)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(Run, None, ["model.kind=vq", "unet.block_out_channels=[32,64,128]", "train.seed=7"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(Run, tmp_path / "saved.yaml")
    assert again == cfg
    assert diff_configs(to_dict(cfg), to_dict(again)) == []
    changed = load_config(Run, tmp_path / "saved.yaml", ["train.seed=8"])
    assert diff_configs(to_dict(cfg), to_dict(changed)) == ["train.seed"]


def test_shipped_yaml_configs_load_against_their_run_configs(tmp_path):
    """Every YAML under configs/vae and configs/ldm is valid for the run config of its script."""
    from pathlib import Path

    from ldm_app.training.ldm import LDMRunConfig
    from ldm_app.training.vae import VAERunConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    vae_files, ldm_files = sorted((root / "vae").glob("*.yaml")), sorted((root / "ldm").glob("*.yaml"))
    assert len(vae_files) >= 2 and len(ldm_files) >= 2
    for f in vae_files:
        assert isinstance(load_config(VAERunConfig, f), VAERunConfig)
    for f in ldm_files:
        cfg = load_config(LDMRunConfig, f, [f"ldm.pretrained_vae={tmp_path}"])
        assert cfg.unet.in_channels >= 1
