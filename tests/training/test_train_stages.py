"""Each of this room's stages, run from its micro config: the loss goes down on a small fixed
dataset, the logs and the product are written, and the product loads where it is used."""

import json

import pytest
import torch
from training_harness import micro_config, micro_dict

from snapgen.model_dir import load_pipeline
from snapgen.models.autoencoder import load_decoder, load_encoder
from training.config import ConfigError, parse_config
from training.logger import read_metrics
from training.loop import Trainer, train


def _first_last(run_dir, metric="loss"):
    series = read_metrics(run_dir / "metrics.csv")[metric]
    return series[0][1], series[-1][1]


def test_autoencoder_overfits_and_exports_normalised_latents(micro_autoencoder):
    run = micro_autoencoder.parent
    first, last = _first_last(run)
    assert last < 0.3 * first
    assert (run / "loss.png").is_file() and list((run / "tb").iterdir()) and (run / "samples").is_dir()
    encoder, decoder = load_encoder(micro_autoencoder), load_decoder(micro_autoencoder)
    # scaling/shift come from the latents of the training images: normalised, they are ~N(0, 1).
    config = micro_config("autoencoder", run.parent)
    from training.data import build_dataset, collate

    pixels = collate([build_dataset(config.data)[i] for i in range(8)])["pixels"]
    with torch.no_grad():
        z = encoder.to_diffusion(encoder.encode(pixels))
        recon = decoder.decode(decoder.from_diffusion(z))
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-3
    assert recon.shape == pixels.shape


def test_decoder_trains_against_the_frozen_encoder_with_a_patch_gan(micro_root, micro_autoencoder):
    product = train(micro_config("decoder", micro_root, {"autoencoder": micro_autoencoder}))
    run = product.parent
    first, last = _first_last(run)
    assert last < 0.5 * first
    metrics = read_metrics(run / "metrics.csv")
    assert metrics["loss_disc"] and metrics["loss_adv"]  # the GAN ran (from adversarial_start)
    assert set(metrics) >= {"eval/psnr_tiny_vs_image", "eval/psnr_tiny_vs_full", "eval/psnr_full_vs_image"}
    decoder = load_decoder(product)
    assert decoder.class_name == "TinyDecoder"
    assert decoder.scaling_factor == load_encoder(micro_autoencoder).scaling_factor
    assert decoder.decode(torch.randn(2, 4, 8, 8)).shape == (2, 3, 64, 64)


def test_pretrain_loss_goes_down_and_exports_a_loadable_model(micro_pretrain_run):
    trainer, before, after, product = micro_pretrain_run
    assert after < 0.8 * before, (before, after)
    metrics = read_metrics(product.parent / "metrics.csv")
    assert [v for _, v in metrics["resolution"]][0] == 32 and metrics["resolution"][-1][1] == 64  # progressive
    assert (product.parent / "samples" / "step_00000030.png").is_file()
    pipe = load_pipeline(product)
    assert pipe.resolutions == [(64, 64), (32, 32)]
    # The exported U-Net is the EMA copy.
    ema = trainer.stage.ema.module["net"].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    image = pipe("a red circle", seeds=0, steps=2).images[0]
    assert image.size == (64, 64)
    # export_at: the product as of step 20 beside the final one, no temporary folder left behind.
    snapshot = load_pipeline(product.parent / "model-20steps")
    assert snapshot.resolutions == pipe.resolutions
    assert not all(torch.equal(v, ema[k]) for k, v in snapshot.unet.state_dict().items())
    assert not list(product.parent.glob(".snapshot-*"))


def test_class_conditional_pretrain_and_init_from(micro_root, micro_autoencoder):
    product = train(micro_config("pretrain_class", micro_root, {"autoencoder": micro_autoencoder}))
    assert json.loads((product / "classes.json").read_text())[0] == "a red circle"
    assert (product / "class_embedding.safetensors").is_file()
    first, last = _first_last(product.parent)
    assert last < first
    # The text-conditional fine-tuning starts from the class-conditional U-Net.
    upstream = {"autoencoder": micro_autoencoder}
    data = micro_dict("pretrain", micro_root, upstream, out_dir=str(micro_root / "from_class"))
    data["stage_options"]["init_from"] = str(product)
    with pytest.raises(ConfigError, match="init_from takes the U-Net config"):
        Trainer(parse_config(data))  # unet: snapgen-tiny and init_from would contradict each other
    del data["stage_options"]["unet"]
    trainer = Trainer(parse_config(data))
    from snapgen.models.unet import SnapGenUNet

    saved = SnapGenUNet.from_pretrained(product / "unet").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in trainer.stage.model["net"].state_dict().items())


def test_a_model_with_a_tiny_decoder_carries_its_encoder_and_can_be_trained_on(micro_root, micro_autoencoder):
    """A product whose decoder cannot encode keeps the autoencoder its latents came from, so a
    later run can continue from the model directory alone (autoencoder, decoder and init_from)."""
    import shutil

    from snapgen.model_dir import ModelDirectoryError, encoder_dir, read_model_index
    from snapgen.models.tiny_decoder import TinyDecoder

    ae = json.loads((micro_autoencoder / "config.json").read_text())
    tiny = micro_root / "random-tiny-decoder"
    TinyDecoder(latent_channels=4, upsample_factor=8, block_out_channels=(16, 16, 16, 16), norm_num_groups=4,
                scaling_factor=ae["scaling_factor"], shift_factor=ae["shift_factor"]).save_pretrained(tiny)
    config = micro_config("pretrain", micro_root, {"autoencoder": micro_autoencoder}, max_steps=2,
                          out_dir=str(micro_root / "tiny"), stage_options={"decoder": str(tiny)})
    product = train(config)
    assert read_model_index(product)["autoencoder"] == ["snapgen.models.autoencoder", "SmallAutoencoder"]
    assert encoder_dir(product) == product / "autoencoder"
    shipped, original = load_encoder(encoder_dir(product)), load_encoder(micro_autoencoder)
    original_weights = original.model.state_dict()
    assert all(torch.equal(v, original_weights[k]) for k, v in shipped.model.state_dict().items())
    assert shipped.scaling_factor == original.scaling_factor

    data = micro_dict("pretrain", micro_root, out_dir=str(micro_root / "tiny-more"))
    options = data["stage_options"]
    del options["unet"]
    options.update(autoencoder=str(product), decoder=str(product), init_from=str(product))
    trainer = Trainer(parse_config(data))
    assert trainer.stage.inputs.autoencoder_dir == product / "autoencoder"
    assert trainer.stage.decoder_path == product / "decoder"

    bare = micro_root / "tiny-without-encoder"
    shutil.copytree(product, bare)
    shutil.rmtree(bare / "autoencoder")
    with pytest.raises(ModelDirectoryError, match="has no encoder"):
        encoder_dir(bare)
    options["autoencoder"], data["out_dir"] = str(bare), str(micro_root / "tiny-bare")
    with pytest.raises(ConfigError, match="autoencoder: model directory .* has no encoder"):
        Trainer(parse_config(data))


def test_teacher_trains_an_sd3_mmdit_that_the_adapter_reads_alike(micro_teacher_run):
    from training.teacher import load_teacher

    trainer, before, after, product = micro_teacher_run
    assert after < 0.8 * before, (before, after)
    teacher = load_teacher(product)
    stage = trainer.stage
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    text = stage.inputs.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        ours = stage.velocity(stage.ema.module["net"].eval(), x, t, text)
        theirs = teacher(x, t, text).velocity
    torch.testing.assert_close(ours, theirs)
    info = json.loads((product / "teacher.json").read_text())
    assert info["latent_channels"] == 4 and info["latent_size"] == 8
    assert info["trained_latent_sizes"] == [8] and teacher.trained_sizes == (8,)


def test_teacher_product_samples_through_the_pipeline_as_the_stage_does(micro_teacher_run):
    # ShapesBench evaluates the teacher through SnapGenPipeline; it must be the stage's own sampler.
    from snapgen.pipeline import to_uint8
    from training.teacher import load_teacher_pipeline

    trainer, _, _, product = micro_teacher_run
    pipeline = load_teacher_pipeline(product)
    prompts = ["a red circle", "two blue squares"]
    resolution = pipeline.default_size[0]
    ours = pipeline(prompts, seeds=5, steps=3, guidance_scale=2.0, output_type="np").images
    theirs = trainer.stage.sample(prompts, steps=3, guidance=2.0, resolution=resolution, seed=5)
    for a, b in zip(ours, to_uint8(theirs)):
        assert abs(a.astype(int) - b.astype(int)).max() <= 1


def test_teacher_that_does_not_fit_the_latents_fails_before_training(micro_root, micro_autoencoder):
    config = micro_config("teacher", micro_root, {"autoencoder": micro_autoencoder},
                          out_dir=str(micro_root / "bad_teacher"),
                          stage_options={"transformer": {"in_channels": 16, "out_channels": 16}})
    with pytest.raises(ValueError, match="reads 16 and predicts 16 latent channels, the autoencoder has 4"):
        Trainer(config)
    assert not (micro_root / "bad_teacher").exists()


def test_mixed_precision_and_gradient_checkpointing_paths(micro_root, micro_autoencoder):
    # On CPU these are slow and only smoke-tested; on GPUs they are what makes the real run fit.
    for precision in ("bf16", "fp16"):
        config = micro_config("pretrain", micro_root, {"autoencoder": micro_autoencoder}, max_steps=2, sample_every=0,
                              precision=precision, gradient_checkpointing=True,
                              out_dir=str(micro_root / f"amp_{precision}"), data={"resolution_schedule": None})
        with pytest.warns(UserWarning, match="on CPU"):
            trainer = Trainer(config)
        assert trainer.stage.model["net"].gradient_checkpointing
        assert (trainer.scaler is not None) == (precision == "fp16")
        trainer.run()
        losses = read_metrics(micro_root / f"amp_{precision}" / "metrics.csv")["loss"]
        assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)


def test_latent_cache_dir_is_shared_between_stages_and_matches_encoding_again(micro_root, micro_autoencoder):
    from training.data import build_dataset
    from training.loop import Trainer

    cache_dir = micro_root / "latent_cache"
    upstream = {"autoencoder": micro_autoencoder}
    stages = {}
    for name in ("pretrain", "teacher"):
        config = micro_config(name, micro_root, upstream, out_dir=str(micro_root / f"cache_{name}"),
                              latent_cache_dir=str(cache_dir), data={"resolution_schedule": None})
        stages[name] = Trainer(config).stage
    config = stages["pretrain"].config
    resolution = config.data.resolutions()[-1]
    first = stages["pretrain"].prepare_dataset(build_dataset(config.data, resolution), resolution)
    (saved,) = cache_dir.iterdir()
    written = saved.stat().st_mtime_ns
    # The teacher reads the same data: it loads the file instead of encoding again...
    second = stages["teacher"].prepare_dataset(build_dataset(config.data, resolution), resolution)
    assert saved.stat().st_mtime_ns == written and list(cache_dir.iterdir()) == [saved]
    # ...and gets what encoding gives.
    assert torch.equal(first.latents, second.latents) and first.captions == second.captions
    assert second.text_ids == first.text_ids
    # Other data: another file.
    other = config.data.model_copy(update={"seed": config.data.seed + 1})
    stages["pretrain"].config = config.model_copy(update={"data": other})
    stages["pretrain"].prepare_dataset(build_dataset(other, resolution), resolution)
    assert len(list(cache_dir.iterdir())) == 2
