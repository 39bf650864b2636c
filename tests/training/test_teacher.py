"""The teacher adapter: one interface over a diffusers SD3 MMDiT and our U-Net."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel

from snapgen.models.configs import SNAPGEN_TINY, build_unet
from snapgen.text import TextEmbeddings
from training.teacher import (
    SD3TeacherAdapter,
    UNetTeacherAdapter,
    check_teacher_compatible,
    load_teacher,
)

TINY_SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=384,
    caption_projection_dim=16,
    pooled_projection_dim=384,
    out_channels=4,
)


def tiny_sd3(**changes) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**TINY_SD3, **changes})


def random_text(batch: int = 2, length: int = 16) -> TextEmbeddings:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length // 2 :] = False
    return TextEmbeddings(torch.randn(batch, length, 384, generator=g), mask, torch.randn(batch, 384, generator=g))


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([0.2, 0.9])[:batch]


def test_sd3_adapter_shapes_and_time_convention():
    model = tiny_sd3()
    teacher = SD3TeacherAdapter(model)
    x, t = inputs()
    text = random_text()
    out = teacher(x, t, text, return_layers=(0, 1, -1))
    assert out.velocity.shape == (2, 4, 16, 16)
    assert out.features.shape == (2, 16, 8, 8)  # inner dim 2 x 8 on the 16/2 patch grid
    assert set(out.layers) == {0, 1, -1} and all(v.shape == (2, 16, 8, 8) for v in out.layers.values())
    # Our flow time t is SD3's sigma, and SD3 timesteps are 1000 * sigma.
    want = model(x, text.tokens, text.pooled, t * 1000.0).sample
    torch.testing.assert_close(out.velocity, want)
    torch.testing.assert_close(out.layers[-1], out.features)
    assert not torch.equal(out.layers[0], out.layers[1])


def test_sd3_features_are_the_unpatchified_last_block_tokens():
    model = tiny_sd3()
    seen = {}
    model.norm_out.register_forward_pre_hook(lambda _m, args: seen.update(tokens=args[0]))
    x, t = inputs()
    out = SD3TeacherAdapter(model)(x, t, random_text())
    tokens = seen["tokens"]  # (B, 64, 16): the last block's image tokens, row-major over the 8x8 grid
    for row, col in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        torch.testing.assert_close(out.features[:, :, row, col], tokens[:, row * 8 + col, :])


def test_teacher_is_frozen_but_passes_gradients_to_its_input():
    teacher = SD3TeacherAdapter(tiny_sd3())
    teacher.train()
    assert not teacher.model.training
    x, t = inputs()
    x.requires_grad_(True)
    out = teacher(x, t, random_text(), return_layers=(0,))
    (out.velocity.square().mean() + out.layers[0].square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_unet_adapter_layers_and_features():
    torch.manual_seed(0)
    unet = build_unet("snapgen-tiny")
    teacher = UNetTeacherAdapter(unet)
    x, t = inputs()
    text = random_text()
    out = teacher(x, t, text, return_layers=range(teacher.num_layers))
    ref = unet(x, t, text.tokens, text.mask, text.pooled, return_features=True)
    torch.testing.assert_close(out.velocity, ref.sample)
    torch.testing.assert_close(out.features, ref.features)
    assert teacher.feature_channels == SNAPGEN_TINY["block_out_channels"][0] == out.features.shape[1]
    for i, layer in out.layers.items():
        assert layer.shape[:2] == (2, teacher.layer_channels(i))
    with pytest.raises(ValueError, match="out of range"):
        teacher(x, t, text, return_layers=(teacher.num_layers,))


def test_load_teacher_from_saved_directories(tmp_path):
    model = tiny_sd3()
    model.save_pretrained(tmp_path / "sd3" / "transformer", safe_serialization=True)  # a pipeline layout
    build_unet("snapgen-tiny").save_pretrained(tmp_path / "unet", safe_serialization=True)
    sd3 = load_teacher(tmp_path / "sd3")
    assert isinstance(sd3, SD3TeacherAdapter) and not any(p.requires_grad for p in sd3.parameters())
    x, t = inputs()
    text = random_text()
    torch.testing.assert_close(sd3(x, t, text).velocity, SD3TeacherAdapter(model)(x, t, text).velocity)
    assert sd3.trained_sizes == (16,)  # no teacher.json: the config's sample_size
    (tmp_path / "sd3" / "teacher.json").write_text(json.dumps({"trained_latent_sizes": [8, 16]}))
    assert load_teacher(tmp_path / "sd3").trained_sizes == (8, 16)
    assert isinstance(load_teacher(tmp_path / "unet"), UNetTeacherAdapter)
    # A snapgen model directory (a progressive run's product) lists the sizes it was trained at.
    build_unet("snapgen-tiny").save_pretrained(tmp_path / "model" / "unet", safe_serialization=True)
    index = {"latent_factor": 8, "resolutions": [[128, 128], [64, 64]]}
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    assert load_teacher(tmp_path / "model").trained_sizes == (8, 16)
    # fp16 weights on disk (a committed product) load as an fp32 teacher.
    build_unet("snapgen-tiny").half().save_pretrained(tmp_path / "half" / "unet", safe_serialization=True)
    assert load_teacher(tmp_path / "half").dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds no teacher"):
        load_teacher(tmp_path / "other")


def test_compatibility_check_names_every_mismatch():
    teacher = SD3TeacherAdapter(tiny_sd3())
    check_teacher_compatible(teacher, latent_channels=4, latent_size=16, token_dim=384, pooled_dim=384)
    with pytest.raises(ValueError, match="latent channels: teacher 4, student 16"):
        check_teacher_compatible(teacher, 16, 16, 384, 384)
    with pytest.raises(ValueError, match="latent size: teacher trained at 16, student at 32"):
        check_teacher_compatible(teacher, 4, 32, 384, 384)
    progressive = SD3TeacherAdapter(tiny_sd3())
    progressive.trained_sizes = (8, 16)  # trained at 64 px, then 128
    check_teacher_compatible(progressive, 4, 8, 384, 384)
    with pytest.raises(ValueError, match="latent size: teacher trained at 8 and 16, student at 32"):
        check_teacher_compatible(progressive, 4, 32, 384, 384)
    with pytest.raises(ValueError, match="patch size 2"):
        check_teacher_compatible(SD3TeacherAdapter(tiny_sd3(sample_size=15)), 4, 15, 384, 384)
    with pytest.raises(ValueError, match="text token width"):
        check_teacher_compatible(teacher, 4, 16, 768, 384)
    with pytest.raises(ValueError, match="pooled text width"):
        check_teacher_compatible(teacher, 4, 16, 384, None)
