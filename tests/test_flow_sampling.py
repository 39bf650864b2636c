import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from snapgen import flow
from snapgen.sampling import SamplerConfig, cfg_velocity, flow_timesteps, guided, sample_euler
from snapgen.text import TextEmbeddings


def test_interpolation_endpoints_and_velocity():
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(flow.interpolate(x0, eps, 0.0), x0)
    torch.testing.assert_close(flow.interpolate(x0, eps, 1.0), eps)
    t = torch.tensor([0.25, 0.8])
    x_t = flow.interpolate(x0, eps, t)
    torch.testing.assert_close(x_t[1], 0.2 * x0[1] + 0.8 * eps[1])
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.predict_x0(x_t, v, t), x0)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_euler_with_exact_velocity_lands_on_x0(steps):
    """On a straight path the velocity is constant, so Euler is exact for any step count."""
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    out = sample_euler(lambda x, t: eps - x0, eps, flow_timesteps(steps, shift=2.5))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_logit_normal_sampling():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_logit_normal(200_000, location=0.0, scale=1.0, generator=g)
    assert t.min() > 0 and t.max() < 1
    assert t.median() == pytest.approx(0.5, abs=0.01)
    shifted = flow.sample_logit_normal(200_000, location=1.0, scale=1.0, generator=g)
    assert shifted.median() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    # The density integrates to one and peaks in the middle for location 0.
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001)
    density = flow.logit_normal_density(grid)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)
    assert density[10000] > density[2000]


def test_shift_and_resolution_shift():
    t = torch.linspace(0, 1, 11)
    shifted = flow.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert flow.resolution_shift(1024, 1024, 256, 1.0) == pytest.approx(4.0)
    assert flow.resolution_shift(512, 512, 512, 3.0) == pytest.approx(3.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_and_steps_agree_with_diffusers(shift):
    steps = 6
    ours = flow_timesteps(steps, shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.double(), ours, atol=1e-6, rtol=0)

    torch.manual_seed(0)
    weight = torch.randn(4, 4)

    def velocity(x, t):  # some nonlinear, time-dependent field
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) * (1 + t[:, None, None, None])

    noise = torch.randn(2, 4, 3, 3)
    ours_out = sample_euler(velocity, noise, ours)
    x = noise
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(2)
        x = scheduler.step(velocity(x, t), timestep, x).prev_sample
    torch.testing.assert_close(ours_out, x, atol=1e-5, rtol=1e-5)


def test_guidance_formula_and_single_pass_at_one():
    calls = []

    def velocity(x, t, with_uncond):
        calls.append(with_uncond)
        cond = torch.full_like(x, 2.0)
        return torch.cat([cond, torch.full_like(x, 0.5)]) if with_uncond else cond

    x, t = torch.zeros(1, 2), torch.zeros(1)
    torch.testing.assert_close(guided(velocity, 3.0)(x, t), torch.full_like(x, 0.5 + 3 * 1.5))
    torch.testing.assert_close(guided(velocity, 1.0)(x, t), torch.full_like(x, 2.0))
    assert calls == [True, False]


def test_cfg_velocity_runs_both_halves_in_one_call():
    def text(value, batch):
        return TextEmbeddings(tokens=torch.full((batch, 3, 2), value), mask=torch.ones(batch, 3, dtype=torch.bool),
                              pooled=torch.full((batch, 5), value))

    calls = []

    def call(x, t, emb):  # a "model" whose output says which text and time each row saw
        calls.append(x.shape[0])
        return x + emb.tokens[:, 0, 0].view(-1, 1) + emb.pooled[:, 0].view(-1, 1) + t.view(-1, 1)

    x, t = torch.arange(4.0).view(2, 2), torch.tensor([0.5, 0.25])
    velocity = cfg_velocity(call, text(1.0, 2), text(-1.0, 2))
    both = velocity(x, t, True)
    torch.testing.assert_close(both[:2], x + 2.0 + t.view(-1, 1))  # cond first
    torch.testing.assert_close(both[2:], x - 2.0 + t.view(-1, 1))
    torch.testing.assert_close(velocity(x, t, False), both[:2])
    assert calls == [4, 2]
    torch.testing.assert_close(guided(velocity, 3.0)(x, t), x - 2.0 + 3 * 4.0 + t.view(-1, 1))

    unguided = cfg_velocity(call, text(1.0, 2))
    torch.testing.assert_close(guided(unguided, 1.0)(x, t), both[:2])
    with pytest.raises(ValueError, match="uncond is None"):
        guided(unguided, 3.0)(x, t)


def test_sampler_config_distilled_timesteps_and_round_trip(tmp_path):
    config = SamplerConfig(default_steps=4, distilled_timesteps={"4": [1.0, 0.9, 0.7, 0.4]})
    torch.testing.assert_close(config.timesteps(4), torch.tensor([1.0, 0.9, 0.7, 0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(config.timesteps(2), flow_timesteps(2, 1.0))
    config.save(tmp_path)
    assert SamplerConfig.load(tmp_path) == config
    with pytest.raises(ValueError, match="decrease"):
        SamplerConfig(distilled_timesteps={"2": [0.5, 0.9]})
    with pytest.raises(ValueError, match="expected 3"):
        SamplerConfig(distilled_timesteps={"3": [0.9, 0.5]})


def test_resolution_dependent_shift_in_config():
    config = SamplerConfig(shift=1.0, shift_base_resolution=512)
    torch.testing.assert_close(config.timesteps(4, 1024, 1024), flow_timesteps(4, 2.0))
    torch.testing.assert_close(config.timesteps(4, 512, 512), flow_timesteps(4, 1.0))


def test_on_step_reports_progress_and_can_cancel():
    seen = []

    class Cancelled(Exception):
        pass

    def on_step(i, n, x):
        seen.append((i, n))
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_euler(lambda x, t: x, torch.ones(1, 1), flow_timesteps(5), on_step)
    assert seen == [(1, 5), (2, 5)]
    with pytest.raises(ValueError, match="at least 1"):
        flow_timesteps(0)
