"""Tiny decoder, small autoencoder and the uniform decoder/encoder loader (CPU, small shapes)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

from snapgen.models.autoencoder import (
    DECODER_CLASSES,
    LatentDecoder,
    SmallAutoencoder,
    load_decoder,
    load_encoder,
)
from snapgen.models.tiny_decoder import TinyDecoder


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_autoencoder_kl(shift_factor=None) -> AutoencoderKL:
    # Factor 2, 4-ch latents, a few thousand params: enough to exercise the real class.
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    )


def tiny_autoencoder_tiny() -> AutoencoderTiny:
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )


def small_autoencoder() -> SmallAutoencoder:
    return SmallAutoencoder(block_out_channels=(8, 16), norm_num_groups=4, scaling_factor=0.8, shift_factor=0.1)


# ---------------------------------------------------------------------------------------- TinyDecoder


@pytest.mark.parametrize(
    "latent_channels, factor, size",
    [(16, 8, 4), (4, 8, 5), (8, 4, 6), (4, 2, 3), (3, 1, 4), (16, 16, 2)],
)
def test_tiny_decoder_shapes(latent_channels, factor, size):
    torch.manual_seed(0)
    decoder = TinyDecoder(latent_channels=latent_channels, upsample_factor=factor).eval()
    with torch.no_grad():
        x = decoder.decode(torch.randn(2, latent_channels, size, size + 1) * 5)
    assert x.shape == (2, 3, size * factor, (size + 1) * factor)
    assert x.is_contiguous()
    assert x.abs().max() <= 1.0  # clamped in eval mode


def test_tiny_decoder_small_domain_shapes():
    decoder = TinyDecoder.for_latents(latent_channels=4, upsample_factor=8).eval()
    assert decoder.config.scaling_factor == 1.0 and decoder.config.shift_factor == 0.0
    assert n_params(decoder) < 300_000
    with torch.no_grad():
        assert decoder(torch.randn(1, 4, 16, 16)).shape == (1, 3, 128, 128)


def test_tiny_decoder_default_size_and_design():
    decoder = TinyDecoder()
    assert 1_200_000 <= n_params(decoder) <= 1_600_000
    cfg = decoder.config
    assert (cfg.latent_channels, cfg.upsample_factor) == (16, 8)
    assert cfg.scaling_factor == pytest.approx(1.5305) and cfg.shift_factor == pytest.approx(0.0609)
    assert sum(isinstance(m, nn.GroupNorm) for m in decoder.modules()) == 1
    assert not any("attention" in type(m).__name__.lower() for m in decoder.modules())
    # Every 3x3 conv except the input/output ones is depthwise.
    full_3x3 = [
        name
        for name, m in decoder.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
    ]
    assert full_3x3 == ["conv_in", "conv_out"]


def test_tiny_decoder_training_mode_is_unclamped():
    decoder = TinyDecoder.for_latents().train()
    with torch.no_grad():
        decoder.conv_out.bias.fill_(3.0)
        assert decoder(torch.randn(1, 4, 2, 2)).min() > 1.0
        assert decoder.eval()(torch.randn(1, 4, 2, 2)).max() == 1.0


def test_tiny_decoder_rejects_bad_layouts():
    with pytest.raises(ValueError, match="power of 2"):
        TinyDecoder(upsample_factor=6)
    with pytest.raises(ValueError, match="entries"):
        TinyDecoder(upsample_factor=8, block_out_channels=(64, 32))


@pytest.mark.parametrize("make", [TinyDecoder.for_latents, small_autoencoder], ids=["tiny", "small_ae"])
def test_save_load_round_trip(tmp_path, make):
    torch.manual_seed(0)
    model = make()
    for p in model.parameters():  # zero-initialised layers would hide a loading bug
        nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == type(model).__name__

    loaded = type(model).from_pretrained(tmp_path, use_safetensors=True)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.eval().decode(z), model.eval().decode(z))


# ----------------------------------------------------------------------------------- SmallAutoencoder


def test_small_autoencoder_default_shapes():
    ae = SmallAutoencoder().eval()
    assert 500_000 <= n_params(ae) <= 900_000
    assert ae.config.downsample_factor == 8 and ae.config.latent_channels == 4
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (1, 4, 16, 16)
        assert torch.equal(ae.encode(x), z)  # deterministic
        assert ae.decode(z).shape == ae(x).shape == x.shape
    with pytest.raises(ValueError, match="downsample_factor"):
        SmallAutoencoder(block_out_channels=(8, 16), downsample_factor=8)


def test_small_autoencoder_overfits_one_batch():
    torch.manual_seed(0)
    ae = SmallAutoencoder().train()
    # A smooth batch: a handful of steps must visibly reduce the reconstruction error.
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(ae(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# -------------------------------------------------------------------------------------------- loaders


def _save(tmp_path, kind):
    torch.manual_seed(0)
    model = {
        "TinyDecoder": lambda: TinyDecoder.for_latents(upsample_factor=2, scaling_factor=0.7, shift_factor=0.2),
        "SmallAutoencoder": small_autoencoder,
        "AutoencoderKL": tiny_autoencoder_kl,
        "AutoencoderTiny": tiny_autoencoder_tiny,
    }[kind]().eval()
    model.save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


@pytest.mark.parametrize("kind", DECODER_CLASSES)
def test_load_decoder_dispatch(tmp_path, kind):
    model, path = _save(tmp_path, kind)
    decoder = load_decoder(path)
    assert isinstance(decoder, LatentDecoder) and decoder.class_name == kind
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    assert type(decoder.scaling_factor) is float and type(decoder.shift_factor) is float
    expected = {
        "TinyDecoder": (0.7, 0.2),
        "SmallAutoencoder": (0.8, 0.1),
        "AutoencoderKL": (0.5, 0.0),  # shift_factor None -> 0.0
        "AutoencoderTiny": (1.0, 0.0),
    }[kind]
    assert (decoder.scaling_factor, decoder.shift_factor) == pytest.approx(expected)

    z = torch.randn(2, 4, 4, 4) * 3
    with torch.no_grad():
        x = decoder.decode(z)
        diffusers_class = kind in ("AutoencoderKL", "AutoencoderTiny")
        ref = model.decode(z).sample.clamp(-1, 1) if diffusers_class else model.decode(z)
    assert isinstance(x, torch.Tensor) and x.shape == (2, 3, 8, 8)
    assert x.abs().max() <= 1.0
    torch.testing.assert_close(x, ref)
    if kind == "SmallAutoencoder":  # only the decoder half is kept
        assert n_params(decoder) == n_params(model.decoder)

    z_diff = decoder.to_diffusion(z)
    torch.testing.assert_close(decoder.from_diffusion(z_diff), z)


def test_load_decoder_dtype_and_shift(tmp_path):
    tiny_autoencoder_kl(shift_factor=0.0609).save_pretrained(tmp_path)
    decoder = load_decoder(tmp_path, torch_dtype=torch.float64)
    assert decoder.dtype == torch.float64 and decoder.shift_factor == pytest.approx(0.0609)


@pytest.mark.parametrize("kind", ["SmallAutoencoder", "AutoencoderKL", "AutoencoderTiny"])
def test_load_encoder(tmp_path, kind):
    model, path = _save(tmp_path, kind)
    encoder = load_encoder(path)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = encoder.encode(x)
        if kind == "AutoencoderKL":
            ref = model.encode(x).latent_dist.mode()
        elif kind == "AutoencoderTiny":
            ref = model.encode(x).latents
        else:
            ref = model.encode(x)
    assert z.shape == (1, 4, 4, 4)
    torch.testing.assert_close(z, ref)


def test_load_encoder_rejects_decoder_only(tmp_path):
    _, path = _save(tmp_path, "TinyDecoder")
    with pytest.raises(ValueError, match="TinyDecoder"):
        load_encoder(path)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_decoder(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel") as err:
        load_decoder(tmp_path)
    assert all(name in str(err.value) for name in DECODER_CLASSES)


def test_loader_refuses_pickle_weights(tmp_path):
    TinyDecoder.for_latents().save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(EnvironmentError):  # noqa: UP024 - diffusers raises EnvironmentError (= OSError)
        load_decoder(tmp_path)
