"""LADD: the frozen teacher as the discriminator's backbone, heads that learn, a 4/8-step export."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel

from snapgen.model_dir import load_pipeline, save_model
from snapgen.models.autoencoder import SmallAutoencoder
from snapgen.models.configs import build_unet
from snapgen.sampling import SamplerConfig, flow_timesteps
from snapgen.text import MiniLMTextEncoder
from training.discriminator import LADDDiscriminator
from training.stages.ladd import default_layers

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=384, caption_projection_dim=16, pooled_projection_dim=384, out_channels=4,
)


def test_discriminator_heads_give_one_logit_per_location_and_read_the_noise_level():
    torch.manual_seed(0)
    disc = LADDDiscriminator({0: 16, 3: 32}, hidden=8, t_dim=16)
    layers = {0: torch.randn(2, 16, 8, 8), 3: torch.randn(2, 32, 4, 4)}
    logits = disc(layers, torch.tensor([0.3, 0.9]))
    assert [tuple(x.shape) for x in logits] == [(2, 64), (2, 16)]
    # FiLM starts at identity, so t matters once trained; give it weight and t changes the logits.
    torch.nn.init.normal_(disc.heads["0"].film.weight)
    a = disc(layers, torch.tensor([0.3, 0.3]))[0]
    b = disc(layers, torch.tensor([0.9, 0.9]))[0]
    assert not torch.allclose(a, b)
    assert default_layers(38) == [9, 18, 27, 37] and default_layers(2) == [0, 1]


@pytest.fixture(scope="module")
def ladd_parts(tmp_path_factory):
    """A random autoencoder (32 px -> 16x16x4), a tiny SD3 teacher, and a student model directory."""
    root = tmp_path_factory.mktemp("ladd")
    torch.manual_seed(0)
    autoencoder = SmallAutoencoder(block_out_channels=(8, 8), norm_num_groups=4)
    autoencoder.save_pretrained(root / "ae")
    SD3Transformer2DModel(**TINY_SD3).save_pretrained(root / "teacher" / "transformer")
    save_model(root / "student", build_unet("snapgen-tiny"), autoencoder, MiniLMTextEncoder(max_length=16),
               SamplerConfig(default_steps=8))
    return root


def ladd_stage(root, **options):
    from training.config import parse_config, parse_stage_options
    from training.stages import stage_class

    config = parse_config({
        "stage": "ladd", "out_dir": str(root / "run"), "max_steps": 4, "batch_size": 2,
        "data": {"kind": "shapes", "length": 4, "resolution": 32},
        "stage_options": {"autoencoder": str(root / "ae"), "init_from": str(root / "student"),
                          "teacher": str(root / "teacher"), "cache": "off", "sample_shift": 3.0,
                          "disc_hidden": 16, **options},
    })
    cls = stage_class("ladd")
    torch.manual_seed(0)
    return cls(config, parse_stage_options(config, cls.Options), torch.device("cpu")), config


def test_ladd_steps_train_the_heads_keep_the_teacher_frozen_and_export_distilled_times(ladd_parts):
    from training.data import build_dataset, collate

    stage, config = ladd_stage(ladd_parts)
    stage.check_compatible()
    modules = stage.trainable_modules()
    assert set(modules) == {"generator", "discriminator"}
    optimizers = {
        "generator": torch.optim.AdamW(modules["generator"].parameters(), lr=1e-4),
        "discriminator": torch.optim.AdamW(modules["discriminator"].parameters(), lr=1e-2),
    }
    teacher_before = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    dataset = build_dataset(config.data, 32)
    batch = collate([dataset[i] for i in range(2)])

    d_losses = []
    for step in range(12):
        torch.manual_seed(1)  # a fixed batch: same times, noise and re-noising every step
        for name in modules:
            others = [p for other, m in modules.items() if other != name for p in m.parameters()]
            for p in others:  # what the loop does: only this optimizer's parameters need grad
                p.requires_grad_(False)
            loss, metrics = stage.loss(name, batch, step)
            for p in others:
                p.requires_grad_(True)
            optimizers[name].zero_grad()
            held = [None if p.grad is None else p.grad.clone() for p in modules["discriminator"].parameters()]
            loss.backward()
            if name == "generator":  # through the heads and the teacher, into the generator only
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in modules["generator"].parameters())
                for p, g in zip(modules["discriminator"].parameters(), held):
                    assert (p.grad is None and g is None) or torch.equal(p.grad, g)
            optimizers[name].step()
        d_losses.append(metrics["loss_d"])
        stage.on_step_end(step)
    assert d_losses[-1] < d_losses[0] - 0.15, d_losses
    assert all(p.grad is None and not p.requires_grad for p in stage.teacher.parameters())
    for k, v in stage.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])

    product = stage.export(ladd_parts / "run")
    sampler = json.loads((product / "scheduler" / "scheduler_config.json").read_text())
    assert sampler["default_steps"] == 4 and set(sampler["distilled_timesteps"]) == {"4", "8"}
    for n in (4, 8):
        want = flow_timesteps(n, 3.0)[:-1].tolist()
        assert sampler["distilled_timesteps"][str(n)] == pytest.approx(want, abs=1e-6)

    pipe = load_pipeline(product)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1][0])))
    out = pipe(["a red circle"], seeds=0, height=32, width=32)  # steps: the default, 4
    assert seen == pytest.approx(sampler["distilled_timesteps"]["4"], abs=1e-6)
    assert out.images[0].size == (32, 32)


def guided_target(stage, config, teacher):
    """A batch, one generator step, the stage's distillation target, and ``teacher``'s conditional and
    unconditional velocities at the same points, to check the target against."""
    from training.data import build_dataset, collate

    batch = collate([build_dataset(config.data, 32)[i] for i in range(2)])
    torch.manual_seed(2)
    g = stage._generate(batch)
    target = stage._distill_target(batch, g)
    with torch.no_grad():
        cond = teacher(g["x_t"], g["t"], g["text"]).velocity
        uncond = teacher(g["x_t"], g["t"], stage.inputs.encode_prompts(["", ""])).velocity
    return batch, g, target, cond, uncond


def test_guided_distillation_target_is_the_teachers_cfg_combination(ladd_parts):
    stage, config = ladd_stage(ladd_parts, distill_guidance=3.0)
    batch, g, target, cond, uncond = guided_target(stage, config, stage.teacher)
    torch.testing.assert_close(target, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(target, cond, atol=1e-3)  # the guidance changes the target
    # g = 1 is the plain conditional velocity (and costs one teacher call).
    plain, _ = ladd_stage(ladd_parts)
    torch.testing.assert_close(plain._distill_target(batch, g), cond)


def test_the_target_can_span_several_teacher_steps(ladd_parts):
    """With ``distill_teacher_steps`` the target is the teacher's guided Euler steps from the
    student's time to its next one, as one velocity; for 4 student steps and 28 teacher steps the
    teacher steps through exactly the 28-step sampler's times."""
    from training.stages.ladd import teacher_segments

    segments = teacher_segments(4, 28, 3.0)
    assert segments.shape == (4, 8)
    torch.testing.assert_close(segments[:, :-1].flatten(), flow_timesteps(28, 3.0)[:-1].float())
    torch.testing.assert_close(segments[:, 0], flow_timesteps(4, 3.0)[:-1].float())
    torch.testing.assert_close(segments[:, -1], flow_timesteps(4, 3.0)[1:].float())
    assert teacher_segments(8, 28, 3.0).shape == (8, 5) and teacher_segments(8, None, 3.0).shape == (8, 2)

    stage, config = ladd_stage(ladd_parts, distill_guidance=3.0, distill_teacher_steps=28, student_steps=[4])
    batch, g, target, cond, uncond = guided_target(stage, config, stage.teacher)
    torch.testing.assert_close(g["segment"][:, 0], g["t"])

    n = g["x_t"].shape[0]
    with torch.no_grad():
        x = g["x_t"]
        for i in range(7):
            t, t_next = g["segment"][:, i], g["segment"][:, i + 1]
            c = stage.teacher(x, t, g["text"]).velocity
            u = stage.teacher(x, t, stage.inputs.encode_prompts([""] * n)).velocity
            x = x + (t_next - t).view(-1, 1, 1, 1) * (u + 3.0 * (c - u))
    spanned = (g["x_t"] - x) / (g["t"] - g["segment"][:, -1]).view(-1, 1, 1, 1)
    torch.testing.assert_close(target, spanned, rtol=1e-4, atol=1e-5)
    # Not the teacher's velocity at the student's point (what one teacher step per student step gives).
    assert not torch.allclose(target, uncond + 3.0 * (cond - uncond), atol=1e-3)


def test_rollout_inputs_are_the_students_own_sampling_path(ladd_parts):
    """With ``student_inputs: rollout`` the student's input at the k-th time of its schedule is
    where its own k Euler steps from the sample's noise lead, not noised data."""
    from snapgen.flow import interpolate
    from training.data import build_dataset, collate

    stage, config = ladd_stage(ladd_parts, student_inputs="rollout", student_steps=[4])
    batch = collate([build_dataset(config.data, 32)[i] for i in range(4)])
    torch.manual_seed(1)
    g = stage._generate(batch)
    tau = flow_timesteps(4, 3.0)[:-1].float()
    index = [int((tau - t).abs().argmin()) for t in g["t"]]
    assert max(index) > 0 and min(index) < max(index)  # this seed draws several times
    text = stage.inputs.text(batch, 0.0)
    with torch.no_grad():
        for i, k in enumerate(index):
            x = g["noise"][i : i + 1]
            for j in range(k):
                v = stage.model["net"](x, tau[j : j + 1], text.tokens[i : i + 1], text.mask[i : i + 1],
                                       text.pooled[i : i + 1]).sample
                x = x + (tau[j + 1] - tau[j]) * v
            torch.testing.assert_close(g["x_t"][i : i + 1], x, rtol=1e-4, atol=1e-5)
    noised = interpolate(g["x0"], g["noise"], g["t"])
    later = torch.tensor(index) > 0
    assert not torch.allclose(g["x_t"][later], noised[later], atol=1e-2)  # not the data path
    # The student's output and the loss are computed at those inputs, with a gradient.
    loss, metrics = stage.loss("generator", batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in stage.model["net"].parameters() if p.requires_grad)


def test_a_unet_model_directory_can_be_the_distillation_target(ladd_parts):
    """``distill_teacher`` may be a snapgen model directory (e.g. the 28-step student when it beats
    the small MMDiT): the target is then that U-Net's guided velocity; the MMDiT still discriminates."""
    from training.teacher import SD3TeacherAdapter, UNetTeacherAdapter

    stage, config = ladd_stage(ladd_parts, distill_guidance=2.0, distill_teacher=str(ladd_parts / "student"))
    stage.check_compatible()
    assert isinstance(stage.distill_teacher, UNetTeacherAdapter) and isinstance(stage.teacher, SD3TeacherAdapter)
    _, g, target, cond, uncond = guided_target(stage, config, stage.distill_teacher)
    torch.testing.assert_close(target, uncond + 2.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    # At initialisation the student is its own distillation target: the conditional velocities agree.
    torch.testing.assert_close(g["v"], cond, rtol=1e-4, atol=1e-5)


def test_the_discriminator_and_the_distillation_target_each_read_their_own_text(ladd_parts):
    """A student on ``minilm:layers=0,6`` (768-d tokens) distilled from its own parent, with the
    MMDiT (trained on MiniLM's last layer, 384-d) as the discriminator: each reads what it was
    trained on, and a mismatch is refused before training."""
    from training.config import ConfigError

    config = {**build_unet("snapgen-tiny").config, "cross_attention_dim": 768}
    unet = build_unet({k: v for k, v in config.items() if not k.startswith("_")})
    parent = ladd_parts / "student-te06"
    save_model(parent, unet, SmallAutoencoder.from_pretrained(ladd_parts / "ae"),
               MiniLMTextEncoder(max_length=16, layers=[0, 6]), SamplerConfig(default_steps=8))
    options = dict(init_from=str(parent), distill_teacher=str(parent), text_encoder="minilm:layers=0,6",
                   distill_guidance=2.0)
    with pytest.raises(ConfigError, match="text token width: teacher expects 384, text encoder gives 768"):
        ladd_stage(ladd_parts, **options)[0].check_compatible()
    stage, config = ladd_stage(ladd_parts, teacher_text_encoder="minilm", **options)
    stage.check_compatible()
    from training.data import build_dataset, collate

    batch = collate([build_dataset(config.data, 32)[i] for i in range(2)])
    g = stage._generate(batch)
    target = stage._distill_target(batch, g)
    assert g["text"].tokens.shape[-1] == 384 and g["distill_text"].tokens.shape[-1] == 768
    with torch.no_grad():
        cond = stage.distill_teacher(g["x_t"], g["t"], g["distill_text"]).velocity
        uncond = stage.distill_teacher(g["x_t"], g["t"], stage.inputs.encode_prompts(["", ""])).velocity
    torch.testing.assert_close(target, uncond + 2.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distill_teacher_text_encoder needs a distill_teacher"):
        ladd_stage(ladd_parts, distill_teacher_text_encoder="minilm")


def test_the_parent_unet_can_be_the_discriminator_backbone(ladd_parts):
    """As in LADD's paper, the student's own parent (a snapgen model directory) can discriminate
    and be the distillation target at once: heads sit on its transformer blocks, and the
    generator's adversarial gradient flows through the frozen U-Net."""
    from training.data import build_dataset, collate
    from training.teacher import UNetTeacherAdapter

    # distill_weight 0: any gradient the generator gets comes through the discriminator.
    stage, config = ladd_stage(ladd_parts, teacher=str(ladd_parts / "student"), distill_weight=0.0)
    stage.check_compatible()
    assert isinstance(stage.teacher, UNetTeacherAdapter) and stage.distill_teacher is stage.teacher
    heads = stage.discriminator.heads
    assert len(heads) == len(default_layers(stage.teacher.num_layers)) > 0
    batch = collate([build_dataset(config.data, 32)[i] for i in range(2)])
    generator = stage.trainable_modules()["generator"]
    loss, metrics = stage.loss("generator", batch, 0)
    loss.backward()
    assert metrics["adv_g"] != 0 and all(p.grad is None for p in stage.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


def test_a_trained_backbone_learns_with_the_heads_and_the_teacher_stays_frozen(ladd_parts):
    """``disc_backbone: trained``: the heads read a trainable copy of the teacher, which the
    discriminator's step updates and the generator's step leaves alone; the teacher itself (the
    distillation target) never changes. The logged accuracy is the share of logits on the right
    side of 0."""
    from training.data import build_dataset, collate
    from training.stages.ladd import discriminator_accuracy

    stage, config = ladd_stage(ladd_parts, disc_backbone="trained")
    stage.check_compatible()
    backbone = stage.discriminator.backbone
    assert backbone is not None and backbone is not stage.teacher
    modules = stage.trainable_modules()
    backbone_params = set(map(id, backbone.parameters()))
    assert backbone_params <= set(map(id, modules["discriminator"].parameters()))
    assert all(p.requires_grad for p in backbone.parameters())
    teacher_before = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    batch = collate([build_dataset(config.data, 32)[i] for i in range(2)])
    optimizer = torch.optim.AdamW(modules["discriminator"].parameters(), lr=1e-3)

    for p in modules["discriminator"].parameters():  # the generator's step, as the loop runs it
        p.requires_grad_(False)
    loss, _ = stage.loss("generator", batch, 0)
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    for p in modules["discriminator"].parameters():
        p.requires_grad_(True)
    for p in modules["generator"].parameters():
        p.requires_grad_(False)
    loss, metrics = stage.loss("discriminator", batch, 0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    optimizer.step()
    assert any(not torch.equal(v, backbone_before[k]) for k, v in backbone.state_dict().items())
    for k, v in stage.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert 0.0 <= metrics["d_accuracy"] <= 1.0

    real, fake = torch.tensor([[1.0, -1.0, 2.0, 3.0]]), torch.tensor([[-1.0, -2.0, 1.0, -3.0]])
    assert discriminator_accuracy([(real, fake)]) == pytest.approx((0.75 + 0.75) / 2)
    assert discriminator_accuracy([(real, fake), (-real, -fake)]) == pytest.approx(0.5)
