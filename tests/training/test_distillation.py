"""Output/feature KD against hand formulas, and what timestep-aware scaling promises."""

import pytest
import torch

from snapgen.flow import logit_normal_density
from training.distillation import (
    FeatureProjector,
    TimestepAwareScaling,
    combine_losses,
    feature_kd_loss,
    output_kd_loss,
    resize_to,
)


def test_output_kd_is_per_sample_mse_and_never_trains_the_teacher():
    student = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    teacher = torch.tensor([[[[0.0, 4.0]]], [[[3.0, -1.0]]]], requires_grad=True)
    loss = output_kd_loss(student, teacher)
    torch.testing.assert_close(loss, torch.tensor([(1 + 4) / 2, (9 + 1) / 2]))
    loss.sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_feature_kd_resizes_the_teacher_map_to_the_student():
    # Shrinking: area resize = the mean of each 2x2 block.
    teacher = torch.arange(16.0).reshape(1, 1, 4, 4)
    blocks = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    torch.testing.assert_close(resize_to(teacher, (2, 2))[0, 0], blocks)
    student = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(feature_kd_loss(student, teacher), ((blocks - 1) ** 2).mean().reshape(1))
    # Enlarging (the MMDiT's patch grid is coarser than the U-Net's last map): bilinear keeps a flat map flat.
    flat = torch.full((2, 3, 8, 8), 0.5)
    assert resize_to(flat, (16, 16)).shape == (2, 3, 16, 16)
    torch.testing.assert_close(feature_kd_loss(torch.zeros(2, 3, 16, 16), flat), torch.full((2,), 0.25))


def test_feature_projector_maps_student_channels_to_teacher_channels():
    projector = FeatureProjector(32, 48)
    convs = [m for m in projector.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1)]
    assert projector(torch.randn(2, 32, 16, 16)).shape == (2, 48, 16, 16)


def test_task_weight_is_the_normalised_logit_normal_density():
    scaling = TimestepAwareScaling(location=0.0, scale=1.0)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
    a = scaling.task_weight(t)
    torch.testing.assert_close(a, logit_normal_density(t) / logit_normal_density(torch.tensor(0.5)))
    assert a[3] == pytest.approx(1.0)  # the mode: the task alone
    kd_weight = 1 - a
    assert torch.all(kd_weight[:3].diff() < 0) and torch.all(kd_weight[3:].diff() > 0)
    assert kd_weight[0] > 0.99 and kd_weight[-1] > 0.99
    # A shifted distribution moves the task-only point with it.
    shifted = TimestepAwareScaling(location=1.0, scale=1.0)
    u = torch.linspace(0.01, 0.99, 99)
    assert u[shifted.task_weight(u).argmax()] > 0.6


def _bayes_task_loss(t: float, centres: torch.Tensor, spread: float, n: int, g: torch.Generator) -> float:
    """E|v - E[v | x_t]|^2: the task loss of the best possible student, for a Gaussian-mixture x0."""
    k = torch.randint(len(centres), (n,), generator=g)
    x0 = centres[k] + spread * torch.randn(n, centres.shape[1], generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = (1 - t) * x0 + t * eps
    var = (1 - t) ** 2 * spread**2 + t**2  # per dim, of x_t given the component
    cov = t - (1 - t) * spread**2  # of v = eps - x0 with x_t, given the component
    offset = x_t[:, None] - (1 - t) * centres[None]
    posterior = (-0.5 * offset.square().sum(-1) / var).softmax(-1)
    v_mean = ((-centres[None] + cov / var * offset) * posterior[..., None]).sum(1)
    return float((eps - x0 - v_mean).square().mean())


def test_kd_weight_is_high_where_the_task_loss_is_hard():
    # Image-like latents: a few well-separated modes (scenes) with fine detail inside each.
    # Even the Bayes-optimal student has a large task loss near t = 0 (the noise cannot be read
    # from x_t) and near t = 1 (the image cannot), and a small one in the middle.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g)
    times = [0.02, 0.05, 0.3, 0.5, 0.95, 0.98]
    hard = torch.tensor([_bayes_task_loss(t, centres, 0.05, 2000, g) for t in times])
    kd_weight = 1 - TimestepAwareScaling().task_weight(torch.tensor(times))
    ends, middle = [0, 1, 4, 5], [2, 3]
    assert hard[ends].min() > 3 * hard[middle].max()
    assert kd_weight[ends].min() > 0.9 > 0.2 > kd_weight[middle].max()


def _toy_batch(seed: int = 0):
    """A linear 'student' so gradients are easy to compare; task and KD targets differ."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 8, generator=g, requires_grad=True)
    x = torch.randn(6, 8, generator=g)
    task_target = torch.randn(6, 8, generator=g)
    teacher = torch.randn(6, 8, generator=g)
    t = torch.tensor([0.02, 0.1, 0.5, 0.5, 0.9, 0.98])
    return weight, x, task_target, teacher, t


def _losses(weight, x, task_target, teacher, teacher_scale=1.0):
    v = x @ weight
    task = (v - task_target).square().mean(1)
    out = (v - teacher_scale * teacher).square().mean(1)
    return task, out


def test_scaled_kd_matches_the_task_magnitude_whatever_the_raw_kd_scale():
    scaling = TimestepAwareScaling()
    weight, x, task_target, teacher, t = _toy_batch()
    task, out = _losses(weight, x, task_target, teacher)
    loss, _ = scaling(t, task, {"out": out}, {"out": 1.0})
    # r L_kd has the value of L_task per sample, so the total equals the task loss...
    torch.testing.assert_close(loss, task.mean())
    (grad,) = torch.autograd.grad(loss, weight)

    # ...and a KD term 100x larger (a differently scaled teacher feature space) changes nothing,
    # neither the value nor the gradient.
    task, out = _losses(weight, x, task_target, teacher)
    loss_100, _ = scaling(t, task, {"out": 100.0 * out}, {"out": 1.0})
    (grad_100,) = torch.autograd.grad(loss_100, weight)
    torch.testing.assert_close(loss_100, loss)
    torch.testing.assert_close(grad_100, grad)

    # Teacher outputs x100: a different KD target, so a different gradient direction, but the
    # same magnitude of loss, while the plain sum explodes.
    task, out = _losses(weight, x, task_target, teacher, teacher_scale=100.0)
    loss_t100, _ = scaling(t, task, {"out": out}, {"out": 1.0})
    torch.testing.assert_close(loss_t100, loss)
    plain, _ = combine_losses(t, task, {"out": out}, {"out": 1.0}, scaling=None)
    assert plain > 1000 * loss


def test_gradient_is_the_task_at_the_mode_and_the_teacher_at_the_ends():
    scaling = TimestepAwareScaling()
    weight, x, task_target, teacher, t = _toy_batch()

    def grads(i):
        task, out = _losses(weight, x[i : i + 1], task_target[i : i + 1], teacher[i : i + 1])
        total, _ = scaling(t[i : i + 1], task, {"out": out}, {"out": 1.0})
        return [torch.autograd.grad(v.sum(), weight, retain_graph=True)[0] for v in (total, task, out)]

    g_total, g_task, _ = grads(2)  # t = 0.5, the mode: a = 1
    torch.testing.assert_close(g_total, g_task)
    g_total, g_task, g_kd = grads(0)  # t = 0.02: a ~ 0, the gradient points at the teacher
    cosine = torch.nn.functional.cosine_similarity
    to_kd = cosine(g_total.flatten(), g_kd.flatten(), dim=0)
    assert to_kd > 0.99 and to_kd > cosine(g_total.flatten(), g_task.flatten(), dim=0) + 0.03


def test_each_kd_term_is_scaled_on_its_own_and_the_weights_share_the_kd_budget():
    scaling = TimestepAwareScaling()
    t = torch.tensor([0.05, 0.5, 0.95])
    task = torch.tensor([2.0, 1.0, 3.0], requires_grad=True)
    out = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    feat = torch.tensor([500.0, 700.0, 900.0], requires_grad=True)  # features on a much larger scale
    loss, metrics = scaling(t, task, {"out": out, "feat": feat}, {"out": 3.0, "feat": 1.0})
    torch.testing.assert_close(loss, task.mean())
    loss.backward()
    a = scaling.task_weight(t)
    # d/dL_k of (1 - a) w_k sg(L_task / L_k) L_k, with w = (3/4, 1/4).
    torch.testing.assert_close(out.grad, (1 - a) * 0.75 * task.detach() / out.detach() / 3, rtol=1e-5, atol=0)
    torch.testing.assert_close(feat.grad, (1 - a) * 0.25 * task.detach() / feat.detach() / 3, rtol=1e-5, atol=0)
    torch.testing.assert_close(task.grad, a / 3)
    assert set(metrics) >= {"kd_task_weight", "kd_ratio_out", "kd_ratio_feat"}


def test_without_scaling_or_without_kd():
    t = torch.tensor([0.3, 0.7])
    task, out, feat = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([4.0, 0.0])
    loss, metrics = combine_losses(t, task, {"out": out, "feat": feat}, {"out": 1.0, "feat": 0.5}, scaling=None)
    assert loss == pytest.approx(((1 + 0.5 + 2) + (2 + 0.5 + 0)) / 2)
    assert metrics == {"task": 1.5, "kd_out": 0.5, "kd_feat": 2.0}
    # KD off (the no-KD baseline): the task loss alone, with or without scaling.
    for scaling in (None, TimestepAwareScaling()):
        loss, _ = combine_losses(t, task, {"out": out}, {"out": 0.0}, scaling=scaling)
        assert loss == pytest.approx(1.5)


def test_task_weight_follows_a_shifted_sampling_distribution():
    # Drawing t through shift_time moves the density; a(t) must be that density, normalised.
    from snapgen.flow import sample_logit_normal, shift_time

    scaling = TimestepAwareScaling(0.0, 1.0, shift=3.0)
    torch.manual_seed(0)
    t = shift_time(sample_logit_normal(200_000), 3.0)
    counts = torch.histc(t, bins=20, min=0, max=1)
    centres = (torch.arange(20) + 0.5) / 20
    empirical = counts / counts.sum() * 20
    torch.testing.assert_close(scaling.density(centres.double()).float(), empirical, atol=0.05, rtol=0.05)
    assert centres[scaling.task_weight(centres).argmax()] > 0.6


# -- the kd stage ----------------------------------------------------------------------------------

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=384, caption_projection_dim=16, pooled_projection_dim=384, out_channels=4,
)


@pytest.fixture(scope="module")
def kd_parts(tmp_path_factory):
    """A random 32 px -> 16x16x4 autoencoder and a random tiny SD3 teacher, saved like real ones."""
    from diffusers import SD3Transformer2DModel

    from snapgen.models.autoencoder import SmallAutoencoder

    root = tmp_path_factory.mktemp("kd")
    torch.manual_seed(0)
    SmallAutoencoder(block_out_channels=(8, 8), norm_num_groups=4).save_pretrained(root / "ae")
    SD3Transformer2DModel(**TINY_SD3).save_pretrained(root / "teacher" / "transformer")
    return root


def kd_stage(root, resolution=32, **options):
    from training.config import parse_config, parse_stage_options
    from training.stages import stage_class

    config = parse_config({
        "stage": "kd", "out_dir": str(root / "run"), "max_steps": 4, "batch_size": 2,
        "data": {"kind": "shapes", "length": 4, "resolution": resolution},
        "stage_options": {"autoencoder": str(root / "ae"), "unet": "snapgen-tiny", "teacher": str(root / "teacher"),
                          "cache": "off", "cfg_dropout": 0.0, **options},
    })
    cls = stage_class("kd")
    torch.manual_seed(0)
    return cls(config, parse_stage_options(config, cls.Options), torch.device("cpu")), config


def fixed_batch(config):
    from training.data import build_dataset, collate

    dataset = build_dataset(config.data, config.data.resolution)
    return collate([dataset[i] for i in range(2)])


def test_kd_stage_trains_student_and_projector_against_a_frozen_teacher(kd_parts):
    stage, config = kd_stage(kd_parts)
    stage.check_compatible()
    modules = stage.trainable_modules()
    assert set(modules) == {"model"} and set(modules["model"]) == {"net", "projector"}
    assert not any(p is q for p in modules["model"].parameters() for q in stage.teacher.parameters())
    before = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(modules["model"].parameters(), lr=1e-3)
    batch = fixed_batch(config)
    for step in range(2):
        torch.manual_seed(step)
        loss, metrics = stage.loss("model", batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stage.on_step_end(step)
    assert {"task", "kd_out", "kd_feat", "kd_task_weight", "kd_ratio_out", "kd_ratio_feat"} <= set(metrics)
    # Timestep-aware scaling keeps the loss on the task's scale.
    assert metrics["loss"] == pytest.approx(metrics["task"], rel=1e-4)
    assert all(p.grad is not None for p in modules["model"]["projector"].parameters())
    assert all(p.grad is None for p in stage.teacher.parameters())
    for k, v in stage.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    exported = stage.export(kd_parts / "run")
    assert (exported / "unet" / "config.json").is_file() and not (exported / "projector").exists()


def test_kd_stage_switches_and_teacher_mismatch(kd_parts):
    from training.config import ConfigError

    stage, config = kd_stage(kd_parts, kd=False, teacher=None)  # the no-KD baseline
    assert stage.teacher is None and set(stage.trainable_modules()["model"]) == {"net"}
    torch.manual_seed(0)
    loss, metrics = stage.loss("model", fixed_batch(config), 0)
    assert metrics == {"loss": pytest.approx(loss.item()), "task": pytest.approx(loss.item())}

    # 64 px -> 32x32 latents, but the teacher was trained at 16x16: refused before training.
    stage, _ = kd_stage(kd_parts, resolution=64, feature_kd=False)
    assert "projector" not in stage.model
    with pytest.raises(ConfigError, match="latent size: teacher trained at 16, student at 32"):
        stage.check_compatible()
    with pytest.raises(ConfigError, match="needs a teacher"):
        kd_stage(kd_parts, teacher=None)


def test_kd_applies_only_at_the_resolutions_the_teacher_teaches(kd_parts):
    """A progressive run whose teacher knows only the last size: ``kd_resolutions`` keeps the
    teacher out of the earlier phase (task loss alone, no teacher call) and in the later one."""
    from training.config import ConfigError, parse_config, parse_stage_options
    from training.stages import stage_class

    def progressive(**options):
        config = parse_config({
            "stage": "kd", "out_dir": str(kd_parts / "run-progressive"), "max_steps": 4, "batch_size": 2,
            "data": {"kind": "shapes", "length": 4, "resolution": 32, "resolution_schedule": [[0, 16], [2, 32]]},
            "stage_options": {"autoencoder": str(kd_parts / "ae"), "unet": "snapgen-tiny",
                              "teacher": str(kd_parts / "teacher"), "cache": "off", "cfg_dropout": 0.0, **options},
        })  # fmt: skip
        cls = stage_class("kd")
        return cls(config, parse_stage_options(config, cls.Options), torch.device("cpu")), config

    stage, _ = progressive()
    with pytest.raises(ConfigError, match="student at 8"):  # 16 px -> 8x8 latents: untaught size
        stage.check_compatible()
    stage, _ = progressive(kd_resolutions=[16, 32])
    with pytest.raises(ConfigError, match="student at 8"):
        stage.check_compatible()
    stage, config = progressive(kd_resolutions=[32])
    stage.check_compatible()
    calls = []
    stage.teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    for resolution, taught in ((16, False), (32, True)):
        stage.resolution = resolution
        config.data.resolution = resolution
        batch = fixed_batch(config)
        torch.manual_seed(0)
        _, metrics = stage.loss("model", batch, 0)
        assert ("kd_out" in metrics) is taught and len(calls) == int(taught)
    stage, _ = progressive(kd_resolutions=[64])
    with pytest.raises(ConfigError, match="kd_resolutions"):
        stage.check_compatible()
