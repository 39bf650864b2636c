"""The kd and ladd micro configs end to end through ``snapgen train``: KD lowers the loss,
LADD exports 4- and 8-step samplers at its distilled times, and a LADD run resumes exactly."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_harness import fixed_loss, micro_config, micro_dict

from snapgen.cli import main
from snapgen.model_dir import load_pipeline
from training import checkpoint
from training.logger import read_metrics
from training.loop import Trainer


def snapgen_train(stage: str, data: dict, path, *args: str) -> int:
    path.write_text(yaml.safe_dump(data))
    return main(["train", stage, "--config", str(path), *args])


@pytest.fixture(scope="module")
def kd_run(micro_root, micro_autoencoder, micro_teacher, tmp_path_factory):
    upstream = {"autoencoder": micro_autoencoder, "teacher": micro_teacher}
    data = micro_dict("kd", micro_root, upstream)
    config = micro_config("kd", micro_root, upstream)
    before = fixed_loss(Trainer(config))
    assert snapgen_train("kd", data, tmp_path_factory.mktemp("cfg") / "kd.yaml") == 0
    after = fixed_loss(Trainer(config, resume=True))  # the last checkpoint, at max_steps: trains nothing
    return before, after, micro_root / "kd" / "model"


def test_kd_micro_lowers_the_loss_and_exports_the_student_alone(kd_run):
    before, after, product = kd_run
    assert after < 0.8 * before, (before, after)
    metrics = read_metrics(product.parent / "metrics.csv")
    assert {"task", "kd_out", "kd_feat", "kd_task_weight", "kd_ratio_out", "kd_ratio_feat"} <= set(metrics)
    # With timestep-aware scaling the logged loss is the task loss (the KD terms carry its magnitude).
    assert [v for _, v in metrics["loss"]] == pytest.approx([v for _, v in metrics["task"]], rel=1e-3)
    weights = load_file(product / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("projector" in k for k in weights)
    assert load_pipeline(product)("a red circle", seeds=0, steps=2).images[0].size == (64, 64)


def ladd_data(micro_root, micro_autoencoder, micro_teacher, kd_product, name):
    upstream = {"autoencoder": micro_autoencoder, "teacher": micro_teacher, "kd": kd_product}
    return micro_dict("ladd", micro_root, upstream, out_dir=str(micro_root / name))


def test_ladd_micro_exports_4_and_8_step_samplers_that_resume_exactly(
    kd_run, micro_root, micro_autoencoder, micro_teacher, tmp_path
):
    data = ladd_data(micro_root, micro_autoencoder, micro_teacher, kd_run[2], "ladd")
    assert snapgen_train("ladd", data, tmp_path / "ladd.yaml") == 0
    run = micro_root / "ladd"
    metrics = read_metrics(run / "metrics.csv")
    assert {"loss_g", "adv_g", "distill", "loss_d", "d_real", "d_fake"} <= set(metrics)
    assert metrics["distill"][-1][1] < metrics["distill"][0][1]  # the generator follows the teacher

    sampler = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sampler["default_steps"] == 4 and set(sampler["distilled_timesteps"]) == {"4", "8"}
    pipe = load_pipeline(run / "model")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(round(float(args[1][0]), 6)))
    pipe("a red circle", seeds=0)  # the default: 4 steps
    pipe("a red circle", seeds=0, steps=8)
    assert seen == sampler["distilled_timesteps"]["4"] + sampler["distilled_timesteps"]["8"]

    # Interrupted after 5 steps, then resumed: the same weights as the straight run, for the
    # generator, the discriminator heads and their optimizers.
    data = ladd_data(micro_root, micro_autoencoder, micro_teacher, kd_run[2], "ladd_resumed")
    assert snapgen_train("ladd", data, tmp_path / "ladd_resumed.yaml", "--max-steps", "5") == 0
    assert snapgen_train("ladd", data, tmp_path / "ladd_resumed.yaml", "--resume") == 0
    a = load_file(checkpoint.latest(run) / checkpoint.WEIGHTS)
    b = load_file(checkpoint.latest(micro_root / "ladd_resumed") / checkpoint.WEIGHTS)
    assert a.keys() == b.keys() and any(k.startswith("model.discriminator.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ladd_refuses_a_teacher_that_does_not_fit_before_training(
    kd_run, micro_root, micro_autoencoder, micro_teacher, tmp_path, capsys
):
    data = ladd_data(micro_root, micro_autoencoder, micro_teacher, kd_run[2], "ladd_bad")
    data["data"]["resolution"] = 128  # 16x16 latents; the micro teacher was trained at 8x8
    assert snapgen_train("ladd", data, tmp_path / "bad.yaml") == 2
    assert "latent size: teacher trained at 8, student at 16" in capsys.readouterr().err
    assert not (micro_root / "ladd_bad").exists()
