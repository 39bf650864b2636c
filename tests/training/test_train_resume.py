"""Checkpoints reload to identical outputs; resume continues exactly; kill leaves a usable checkpoint."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_harness import REPO, micro_config, micro_dict

from training import checkpoint
from training.config import ConfigError
from training.logger import read_metrics
from training.loop import Trainer, train


@pytest.fixture(scope="module")
def straight(micro_pretrain_run):
    """The pretrain micro run, 30 steps uninterrupted (checkpoints at 15 and 30)."""
    return micro_pretrain_run[0]


def test_checkpoint_reloads_to_identical_outputs(straight):
    reloaded = Trainer(straight.config, resume=True)  # at max_steps already: loads, trains nothing
    assert reloaded.step == 30
    a, b = straight.stage, reloaded.stage
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7])
    text = a.inputs.encode_prompts(["a red circle", ""])
    for ma, mb in ((a.model, b.model), (a.ema.module, b.ema.module)):
        with torch.no_grad():
            assert torch.equal(a.velocity(ma["net"].eval(), x, t, text), b.velocity(mb["net"].eval(), x, t, text))
    sa, sb = straight.optimizers["model"].state_dict(), reloaded.optimizers["model"].state_dict()
    assert all(torch.equal(sa["state"][i]["exp_avg_sq"], sb["state"][i]["exp_avg_sq"]) for i in sa["state"])


def test_resume_continues_the_same_trajectory(straight, micro_root, micro_autoencoder):
    out = micro_root / "interrupted"
    config = micro_config("pretrain", micro_root, {"autoencoder": micro_autoencoder}, out_dir=str(out))
    # Stop at 20 (past the resolution switch at 15, between checkpoints), then resume to 30.
    train(config.model_copy(update={"max_steps": 20}))
    assert checkpoint.latest(out).name == "step_00000020"
    train(config, resume=True)

    a = load_file(checkpoint.latest(straight.out_dir) / checkpoint.WEIGHTS)
    b = load_file(checkpoint.latest(out) / checkpoint.WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical: same data, same draws, same math
    la, lb = read_metrics(straight.out_dir / "metrics.csv")["loss"], read_metrics(out / "metrics.csv")["loss"]
    assert [s for s, _ in lb] == [5, 10, 15, 20, 25, 30]  # the curve continues, no duplicate rows
    assert la == lb


def test_resume_refuses_another_config_and_fresh_runs_refuse_old_checkpoints(straight):
    changed = straight.config.model_copy(update={"optim": straight.config.optim.model_copy(update={"lr": 0.5})})
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.5"):
        Trainer(changed, resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(straight.config)
    # What may change on resume: run length (and where its lr cools down), intervals, workers, device.
    cooled = straight.config.optim.model_copy(update={"cooldown_steps": 10})
    longer = straight.config.model_copy(update={"max_steps": 40, "log_every": 3, "optim": cooled})
    assert Trainer(longer, resume=True).step == 30


def test_export_checkpoint_exports_an_older_step_and_leaves_the_run_alone(straight, tmp_path, capsys):
    from snapgen.cli import main
    from snapgen.model_dir import load_pipeline

    run = tmp_path / "run"
    shutil.copytree(straight.out_dir, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(straight.config.model_dump(mode="json")))
    assert main(["train", "pretrain", "--config", str(path), "--out", str(run), "--export-checkpoint", "15"]) == 0

    weights = load_file(run / checkpoint.CHECKPOINTS / "step_00000015" / checkpoint.WEIGHTS)
    ema = {k[len("model.ema.net."):]: v for k, v in weights.items() if k.startswith("model.ema.net.")}
    exported = load_pipeline(run / "model-15steps").unet.state_dict()
    assert exported.keys() == ema.keys()
    assert all(torch.equal(v, ema[k]) for k, v in exported.items())  # the EMA weights of step 15, not 30
    after = sorted(p.relative_to(run) for p in run.rglob("*") if not p.is_relative_to(run / "model-15steps"))
    assert after == before  # no checkpoint, log line or config rewritten, nothing left half-written

    capsys.readouterr()
    assert main(["train", "pretrain", "--config", str(path), "--out", str(run), "--export-checkpoint", "20"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 20 in" in err and "(steps: 15, 30)" in err

    with pytest.raises(SystemExit) as exit_:  # exporting resumes nothing: combining the two is refused
        main(["train", "pretrain", "--config", str(path), "--out", str(run), "--resume", "--export-checkpoint", "15"])
    assert exit_.value.code == 2
    assert "--export-checkpoint: not allowed with argument --resume" in capsys.readouterr().err


def test_killed_run_leaves_a_readable_checkpoint_and_resumes(micro_root, tmp_path):
    out = tmp_path / "killed"
    data = micro_dict("autoencoder", tmp_path, out_dir=str(out), max_steps=400, ckpt_every=2, log_every=2)
    path = tmp_path / "ae.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "snapgen.cli", "train", "autoencoder", "--config", str(path)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(checkpoint.checkpoint_dirs(out)) < 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-step or mid-write
    finally:
        proc.wait()
    latest = checkpoint.latest(out)
    assert latest is not None
    step = checkpoint.read_state(latest)["step"]
    assert load_file(latest / checkpoint.WEIGHTS)  # complete and readable
    config = micro_config("autoencoder", tmp_path, out_dir=str(out), max_steps=step + 2, ckpt_every=2, log_every=2)
    trainer = Trainer(config, resume=True)
    assert trainer.step == step
    trainer.run()
    assert checkpoint.latest(out).name == f"step_{step + 2:08d}"
