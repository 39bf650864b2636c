"""Losses, EMA and the atomic checkpoint writer."""

import math

import pytest
import torch
from torch import nn

from snapgen.flow import interpolate, velocity_target
from training import checkpoint
from training.config import EMAConfig
from training.ema import EMA
from training.losses import RandomFeaturePerceptual, flow_matching_loss, hinge_d_loss, hinge_g_loss, psnr


def test_flow_matching_loss_is_zero_at_the_velocity_and_per_sample():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(flow_matching_loss(velocity_target(x0, noise), x0, noise), torch.zeros(3))
    loss = flow_matching_loss(torch.zeros_like(x0), x0, noise)
    assert torch.allclose(loss, (noise - x0).pow(2).mean(dim=(1, 2, 3)))
    # The implied clean estimate of the true velocity is exact, whatever t.
    t = torch.rand(3)
    x_t = interpolate(x0, noise, t)
    assert torch.allclose(x_t - t[:, None, None, None] * velocity_target(x0, noise), x0, atol=1e-6)


def test_hinge_losses_and_psnr():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 2
    assert hinge_g_loss(torch.tensor([1.0, 3.0])) == -2
    x = torch.zeros(2, 3, 4, 4)
    assert math.isclose(float(psnr(x + 0.2, x)), 10 * math.log10(4 / 0.04), rel_tol=1e-5)


def test_random_feature_perceptual_loss_is_a_fixed_distance():
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    p, q = RandomFeaturePerceptual(), RandomFeaturePerceptual()
    assert float(p(a, a)) == 0 and float(p(a, b)) > 0
    assert torch.equal(p(a, b), q(a, b))  # same seed, same function in every run
    assert not any(w.requires_grad for w in p.parameters())
    blurred = torch.nn.functional.avg_pool2d(a, 3, 1, 1)
    assert float(p(a, blurred)) > 0


def test_ema_tracks_with_warmup():
    model = nn.Linear(2, 2)
    ema = EMA(model, EMAConfig(decay=0.9))
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(model, step=1000)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.module.weight.requires_grad


def test_checkpoint_write_is_atomic_and_round_trips(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, 1, {"m": model}, {"m": optimizer}, {"note": "x"}, keep=2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the run is killed while writing step 2

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"m": model}, {"m": optimizer}, {}, keep=2)
    monkeypatch.undo()
    (tmp_path / "checkpoints" / ".tmp-step_00000003-x").mkdir()  # what a SIGKILL mid-write leaves
    assert checkpoint.latest(tmp_path).name == "step_00000001"
    checkpoint.clean_partial(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = checkpoint.load(checkpoint.latest(tmp_path), {"m": fresh}, {"m": fresh_opt})
    assert state["note"] == "x" and state["step"] == 1
    assert torch.equal(fresh.weight, model.weight)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh_opt.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    for step in (2, 3, 4):
        checkpoint.save(tmp_path, step, {"m": model}, {"m": optimizer}, {}, keep=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]


def test_rng_state_round_trips_through_json():
    import json
    import random

    import numpy as np

    state = json.loads(json.dumps(checkpoint.rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
