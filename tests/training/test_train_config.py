"""Configs: every shipped YAML validates; bad input fails clearly before any training starts."""

from pathlib import Path

import pytest
import yaml
from training_harness import MICRO, REPO, micro_dict

from snapgen.cli import main
from training.config import ConfigError, load_config, parse_config, parse_stage_options
from training.loop import Trainer
from training.stages import stage_class

SHIPPED = sorted(MICRO.glob("*.yaml")) + sorted((REPO / "configs" / "shapes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_validate(path):
    config = load_config(path)
    parse_stage_options(config, stage_class(config.stage).Options)


def test_one_micro_config_per_stage():
    from training.stages import STAGES

    stages = {yaml.safe_load(p.read_text())["stage"] for p in MICRO.glob("*.yaml")}
    assert stages == set(STAGES)


def test_unknown_keys_are_rejected_wherever_they_are(tmp_path):
    data = micro_dict("autoencoder", tmp_path)
    with pytest.raises(ConfigError, match=r"learning_rate: unknown key"):
        parse_config({**data, "learning_rate": 1.0})
    with pytest.raises(ConfigError, match=r"data\.shuffle: unknown key"):
        parse_config({**data, "data": {**data["data"], "shuffle": True}})
    with pytest.raises(ConfigError, match=r"stage_options\.perceptual_wieght: unknown key"):
        Trainer(parse_config({**data, "stage_options": {"perceptual_wieght": 1.0}}))
    with pytest.raises(ConfigError, match="unknown stage"):
        parse_config({**data, "stage": "distill"})
    with pytest.raises(ConfigError, match="resolution_schedule"):
        parse_config({**data, "data": {**data["data"], "resolution_schedule": [[5, 64]]}})


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["train", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_reports_bad_input_without_training(tmp_path, capsys):
    good = micro_dict("autoencoder", tmp_path)
    path = tmp_path / "c.yaml"

    path.write_text(yaml.safe_dump({**good, "batchsize": 4}))
    code, err = _cli(capsys, "autoencoder", "--config", path)
    assert code == 2 and "batchsize: unknown key" in err

    path.write_text(yaml.safe_dump(good))
    code, err = _cli(capsys, "decoder", "--config", path)
    assert code == 2 and "config for stage 'autoencoder'" in err

    missing = tmp_path / "no-such-images"
    path.write_text(yaml.safe_dump({**good, "data": {"kind": "folder", "path": str(missing)}}))
    code, err = _cli(capsys, "autoencoder", "--config", path)
    assert code == 2 and "no such directory" in err

    code, err = _cli(capsys, "autoencoder", "--config", path, "--resume")
    assert code == 2 and "no checkpoint" in err
    assert not Path(good["out_dir"]).exists()  # nothing was trained or written

    code, err = _cli(capsys, "autoencoder", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err


def test_missing_upstream_product_is_a_clear_error(tmp_path):
    config = parse_config(micro_dict("pretrain", tmp_path, stage_options={"autoencoder": str(tmp_path / "none")}))
    with pytest.raises(ConfigError, match="autoencoder .*not a saved model directory"):
        Trainer(config)


def test_resolution_schedule():
    data = micro_dict("pretrain", "/tmp")["data"]
    config = parse_config({**micro_dict("pretrain", "/tmp"), "data": data}).data
    assert [config.resolution_at(s) for s in (0, 14, 15, 100)] == [32, 32, 64, 64]
    assert config.resolutions() == [32, 64]


def test_lr_schedule_warmup_stable_cooldown(tmp_path):
    from training.loop import lr_factor

    optim = {"lr": 1e-3, "warmup_steps": 10, "cooldown_steps": 20, "min_lr_ratio": 0.0}
    config = parse_config({**micro_dict("pretrain", tmp_path), "max_steps": 100, "optim": optim})
    factors = [lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert set(factors[10:80]) == {1.0}
    assert factors[79] > factors[80] > factors[90] > factors[99]  # linear, strictly down
    assert factors[99] == pytest.approx(0.0) and factors[89] == pytest.approx(0.5)
    # The cool-down follows max_steps, so extending a run (--max-steps on --resume) moves it.
    longer = config.model_copy(update={"max_steps": 200})
    assert lr_factor(99, longer) == 1.0
    with pytest.raises(ConfigError, match="cooldown_steps needs schedule: constant"):
        parse_config({**micro_dict("pretrain", tmp_path), "optim": {**optim, "schedule": "cosine"}})


def test_text_encoder_specs():
    from training.inputs import build_text_encoder

    assert build_text_encoder("minilm:layers=0,6").token_dim == 768
    for bad, message in [
        ("minilm:layers=a,b", "write minilm:layers=I,J"),
        ("minilm:depth=2", "write minilm:layers=I,J"),
        ("minilm:layers=9", "hidden-state indices 0..6"),
        ("no/such/dir", "neither 'minilm', 'table:FILE' nor a saved text-encoder directory"),
        ("table:no/such.safetensors", "text table not found"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_text_encoder(bad)
